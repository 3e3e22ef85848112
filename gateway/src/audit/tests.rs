//! Store tests: durability, chain continuity, recovery, file contents.

use std::path::Path;

use super::*;

pub(crate) fn sample(i: usize, time: i64) -> AuditRecord {
    AuditRecord {
        phase: "request".into(),
        request_uid: format!("req-{i}"),
        time,
        class_uid: CLASS_DATASTORE_ACTIVITY,
        activity_id: datastore_activity::QUERY,
        type_uid: i64::from(CLASS_DATASTORE_ACTIVITY) * 100 + 4,
        status_id: status::SUCCESS,
        action_id: action::ALLOWED,
        policy_uid: "read-orders".into(),
        actor_user_uid: format!("oid-{}", i % 7).into(),
        actor_user_name: format!("agent{}@example.com", i % 7).into(),
        actor_user_groups: ["g1".into(), format!("g{}", i % 3)].into(),
        actor_user_roles: if i.is_multiple_of(2) {
            [].into()
        } else {
            ["Reader".to_string()].into()
        },
        actor_process_pid: if i.is_multiple_of(5) {
            None
        } else {
            Some(i as i32)
        },
        actor_process_cgroup_id: Some(1000 + i as i64),
        dst_endpoint_name: "orders-db".into(),
        dst_endpoint_port: Some(5432),
        session_uid: format!("sess-{}", i / 10).into(),
        query_info_query_string: format!("SELECT * FROM orders WHERE id = {i} -- ünïcode"),
        response_rows: i.is_multiple_of(4).then_some(i as i64),
        unmapped: "{}".into(),
        ..Default::default()
    }
}

pub(crate) fn config(dir: &Path) -> AuditConfig {
    AuditConfig::new(dir.join("audit"))
}

/// All records in all segment files, sorted by sequence.
/// Opens the store at `cfg` and appends `sample(i, now)` for i in 0..n;
/// the open log and that `now`.
pub(crate) async fn open_with_samples(cfg: &AuditConfig, n: usize) -> (AuditLog, i64) {
    let log = AuditLog::open(cfg).await.unwrap();
    let now = store::now_ms();
    for i in 0..n {
        log.append(sample(i, now)).await.unwrap();
    }
    (log, now)
}

pub(crate) fn read_segments(dir: &Path) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    for rel in store::list_segment_files(dir).unwrap() {
        out.extend(segment::read_file(&dir.join(rel)).unwrap());
    }
    out.sort_by_key(|r| r.sequence);
    out
}

/// Asserts sequences 1..=n without gaps and every hash link valid.
pub(crate) fn assert_chain(records: &[AuditRecord], n: u64) {
    assert_eq!(records.len() as u64, n);
    let mut prev = GENESIS_HASH.to_string();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.sequence, i as u64 + 1);
        assert_eq!(r.prev_record_hash, prev, "link at {}", r.sequence);
        assert_eq!(r.compute_hash(), r.record_hash, "hash at {}", r.sequence);
        prev = r.record_hash.clone();
    }
}

fn strip(mut r: AuditRecord) -> AuditRecord {
    r.sequence = 0;
    r.prev_record_hash.clear();
    r.record_hash.clear();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_contiguous_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let mut tasks = Vec::new();
    for t in 0..50 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..20 {
                seqs.push(log.append(sample(t * 20 + i, now)).await.unwrap());
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=1000).collect::<Vec<u64>>());
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), 1000);
}

/// The directory's lock taken on its own (as `run` takes it before it
/// pins anything) keeps every other opening out; the store opened with
/// it holds it until it stops, and then the directory opens again.
#[tokio::test]
async fn a_lock_taken_alone_keeps_others_out_until_its_store_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let lock = AuditLog::lock(&cfg).expect("lock");
    let busy = |err: anyhow::Error| {
        let text = format!("{err:#}");
        assert!(text.contains("in use by another process"), "{text}");
    };
    busy(
        AuditLog::open(&cfg)
            .await
            .err()
            .expect("opened past the lock"),
    );
    busy(AuditLog::lock(&cfg).err().expect("locked twice"));
    let log = AuditLog::open_locked(&cfg, lock)
        .await
        .expect("open with the lock");
    log.append(sample(0, store::now_ms()))
        .await
        .expect("append");
    busy(
        AuditLog::open(&cfg)
            .await
            .err()
            .expect("opened past the store"),
    );
    log.shutdown().await;
    let again = AuditLog::open(&cfg)
        .await
        .expect("open once the store stopped");
    again.shutdown().await;
}

#[tokio::test]
async fn segments_hold_exactly_the_appended_records() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let mut sent = Vec::new();
    for i in 0..100 {
        // Times deliberately out of sequence order: files are sorted by time.
        let r = sample(i, now - (i as i64 % 10));
        let seq = log.append(r.clone()).await.unwrap();
        sent.push((seq, r));
    }
    log.shutdown().await;
    let got = read_segments(&cfg.dir);
    assert_chain(&got, 100);
    for (seq, r) in sent {
        assert_eq!(strip(got[seq as usize - 1].clone()), r, "record {seq}");
    }
    // Within each file rows are in time order.
    for rel in store::list_segment_files(&cfg.dir).unwrap() {
        let rows = segment::read_file(&cfg.dir.join(&rel)).unwrap();
        assert!(rows.windows(2).all(|w| w[0].time <= w[1].time), "{rel}");
        assert!(rel.starts_with(&format!("records/date={}/seg-", segment::day_of(now))));
    }
    // The WAL is gone once everything is in manifested segments.
    assert!(wal::list(&cfg.dir.join("wal")).unwrap().is_empty());
}

#[tokio::test]
async fn reopen_continues_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let now = store::now_ms();
    for round in 0..3 {
        let log = AuditLog::open(&cfg).await.unwrap();
        for i in 0..10 {
            let seq = log.append(sample(i, now)).await.unwrap();
            assert_eq!(seq, round * 10 + i as u64 + 1);
        }
        log.shutdown().await;
    }
    assert_chain(&read_segments(&cfg.dir), 30);
    let (m, bad) = manifest::Manifest::read(&cfg.dir).unwrap();
    assert!(bad.is_none());
    assert_eq!(m.entries.len(), 3);
}

#[tokio::test]
async fn segments_close_by_record_count() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_records = 10;
    let (log, _) = open_with_samples(&cfg, 35).await;
    log.shutdown().await;
    let files = store::list_segment_files(&cfg.dir).unwrap();
    // Appends are sequential here, so every cut happens at exactly 10.
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(files[0].ends_with("seg-00000000000000000001-00000000000000000010.parquet"));
    assert_chain(&read_segments(&cfg.dir), 35);
}

/// A segment thread that cannot write (here a file stands where the day's
/// directory goes) keeps its records in memory for a retry: past a few
/// segments' worth, records are refused (fail closed, memory bounded),
/// and once a segment is written again they are taken again, the chain
/// unbroken.
#[tokio::test]
async fn records_are_refused_while_segments_fail_and_too_many_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_records = 10;
    let now = store::now_ms();
    let blocker = block_segments(&cfg, now);
    let log = AuditLog::open(&cfg).await.unwrap();
    let mut accepted = 0usize;
    let mut refusal = None;
    for i in 0..5_000 {
        match log.append(sample(i, now)).await {
            Ok(_) => accepted += 1,
            Err(err) => {
                refusal = Some(err);
                break;
            }
        }
    }
    let refusal = refusal.expect("records taken without bound while segments fail");
    assert!(
        matches!(&refusal, AuditError::Unavailable(m) if m.contains("segments cannot be written")),
        "{refusal}"
    );
    // Four segments' worth wait, and the few taken before the thread's
    // first failure was known.
    assert!((40..=200).contains(&accepted), "{accepted}");

    std::fs::remove_file(&blocker).unwrap();
    append_once_taken_again(&log, || sample(accepted, now)).await;
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), accepted as u64 + 1);
}

/// Makes the segments of day `now` impossible to write: a file stands
/// where their directory goes. Returns it, for the test to remove.
fn block_segments(cfg: &AuditConfig, now: i64) -> std::path::PathBuf {
    let blocker = cfg
        .dir
        .join("records")
        .join(format!("date={}", segment::day_of(now)));
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();
    blocker
}

/// Appends `record()` until the store takes it again (once a segment is
/// written again), for at most 20 s.
/// Appends `record(0)`, `record(1)`, ... one every `pause_ms`, until one is
/// refused or `for_secs` have passed: how many were taken, and the
/// refusal.
async fn append_until_refused(
    log: &AuditLog,
    record: impl Fn(usize) -> AuditRecord,
    pause_ms: u64,
    for_secs: u64,
) -> (usize, Option<AuditError>) {
    let mut accepted = 0usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(for_secs);
    while std::time::Instant::now() < deadline {
        match log.append(record(accepted)).await {
            Ok(_) => accepted += 1,
            Err(err) => return (accepted, Some(err)),
        }
        tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
    }
    (accepted, None)
}

async fn append_once_taken_again(log: &AuditLog, record: impl Fn() -> AuditRecord) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match log.append(record()).await {
            Ok(_) => return,
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "still refused after the segments could be written: {err}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A segment write that hangs (an fsync on a stalled network file
/// system) returns no error, so segments never count as failing: once one
/// piece of the segment thread's work has taken longer than its limit,
/// the records waiting are bounded as while segments fail, and taken
/// again once the write returns.
#[tokio::test]
async fn records_are_refused_while_a_segment_write_hangs_and_their_count_reaches_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    // Four segments' worth: 20 records.
    cfg.segment_max_records = 5;
    store::faults::stall_next_segment(&cfg.dir, 6_000);
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let record = |i: usize| sample(i, now + i as i64);
    let (accepted, refusal) = append_until_refused(&log, record, 20, 5).await;
    let refusal = refusal.expect("records taken without bound while a segment write hangs");
    assert!(
        matches!(&refusal, AuditError::Unavailable(m) if m.contains("segments cannot be written")),
        "{refusal}"
    );
    assert!(
        accepted >= 20,
        "refused after {accepted} records, before the bound"
    );
    append_once_taken_again(&log, || record(accepted)).await;
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), accepted as u64 + 1);
}

/// `record` with a statement of about `bytes` bytes.
fn with_statement_of(mut record: AuditRecord, bytes: usize) -> AuditRecord {
    record.query_info_query_string = format!("SELECT '{}'", "x".repeat(bytes));
    record
}

/// The same bound counted in bytes: a few records holding large
/// statements reach it long before their number reaches four segments'
/// worth. The real bound (1 GiB) is lowered for the test.
#[tokio::test]
async fn records_are_refused_while_segments_fail_and_their_bytes_reach_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    // Four segments' worth is 40 000 records: never reached here.
    cfg.segment_max_records = 10_000;
    cfg.segment_max_age_secs = 1;
    // Far more than the records taken before the segment thread's first
    // failure is known (about a second of them), so that the refusal
    // comes from reaching the bound, not from the failure alone.
    const LIMIT: usize = 16 << 20;
    const STATEMENT: usize = 16 << 10;
    store::faults::limit_backlog_bytes(&cfg.dir.join("wal"), LIMIT);
    let now = store::now_ms();
    let blocker = block_segments(&cfg, now);
    let log = AuditLog::open(&cfg).await.unwrap();
    let large = |i: usize| with_statement_of(sample(i, now), STATEMENT);
    // Slowly enough that segments are cut on age and fail while records
    // still come in.
    let (accepted, refusal) = append_until_refused(&log, large, 5, 30).await;
    let refusal = refusal.expect("large records taken without bound while segments fail");
    assert!(
        matches!(&refusal, AuditError::Unavailable(m) if m.contains("segments cannot be written")),
        "{refusal}"
    );
    // Refused once their bytes reached the bound, and not later: a record
    // counts its encoding, the statement and up to a few KiB more. The
    // count bound (40 000 records) is out of this loop's reach (30 s at
    // one record per 5 ms at most): the refusal is the byte bound's.
    assert!(
        (LIMIT / (STATEMENT + 4096)..=LIMIT / STATEMENT + 1).contains(&accepted),
        "refused after {accepted} records of {STATEMENT} bytes, the bound being {LIMIT} bytes"
    );

    std::fs::remove_file(&blocker).unwrap();
    append_once_taken_again(&log, || large(accepted)).await;
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), accepted as u64 + 1);
}

/// Records of large statements are bounded in bytes even while segments
/// are written: a segment is cut at a quarter of the bound, and while the
/// segment thread is behind by the whole bound (busy, not failing), the
/// writer takes no more: records wait, unacknowledged, and are taken, none
/// refused, once it catches up. The real bound (1 GiB) is lowered for the
/// test.
#[tokio::test]
async fn records_of_large_statements_wait_while_segments_are_a_bound_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_records = 10_000;
    cfg.segment_max_age_secs = 3600;
    const LIMIT: usize = 4 << 20;
    const STATEMENT: usize = 64 << 10;
    const RECORDS: usize = 3 * LIMIT / STATEMENT;
    store::faults::limit_backlog_bytes(&cfg.dir.join("wal"), LIMIT);
    // The segment thread's first piece of work takes 600 ms: behind, but
    // not stalled (1 s in tests, with room for the write itself), and not
    // failing.
    store::faults::stall_next_segment(&cfg.dir, 600);
    let log = std::sync::Arc::new(AuditLog::open(&cfg).await.unwrap());
    let now = store::now_ms();
    let large = move |i: usize| with_statement_of(sample(i, now), STATEMENT);
    // Eight at a time, each eight one batch, as sessions would.
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let submitting = {
        let (log, acknowledged) = (log.clone(), acknowledged.clone());
        tokio::spawn(async move {
            for round in (0..RECORDS).step_by(8) {
                let durables: Vec<_> = (round..round + 8).map(|i| log.submit(large(i))).collect();
                for durable in durables {
                    durable.await.expect("taken, not refused");
                    acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
    };
    // Within the stall: no more acknowledged than the bound holds (and the
    // batch that reached it).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let within_stall = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        within_stall <= LIMIT / STATEMENT + 8,
        "{within_stall} records acknowledged while segments were {LIMIT} bytes behind"
    );
    submitting
        .await
        .expect("every record taken once segments caught up");
    log.shutdown().await;
    let rows = read_segments(&cfg.dir);
    assert_chain(&rows, RECORDS as u64);
    // Cut on bytes, not on the 10 000 records or the hour.
    assert!(
        store::list_segment_files(&cfg.dir).unwrap().len() >= 8,
        "{:?}",
        store::list_segment_files(&cfg.dir).unwrap()
    );
}

/// In `buffered` durability sessions write the WAL on their own threads,
/// which must not wait: there, records that would put segments being
/// written a bound behind are refused, and taken again once they catch up.
#[tokio::test]
async fn buffered_records_are_refused_while_segments_are_a_bound_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.durability = DurabilityMode::Buffered;
    cfg.segment_max_records = 10_000;
    cfg.segment_max_age_secs = 3600;
    const LIMIT: usize = 4 << 20;
    const STATEMENT: usize = 64 << 10;
    store::faults::limit_backlog_bytes(&cfg.dir.join("wal"), LIMIT);
    store::faults::stall_next_segment(&cfg.dir, 600);
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let large = |i: usize| with_statement_of(sample(i, now), STATEMENT);
    let mut accepted = 0;
    let refusal = loop {
        match log.append(large(accepted)).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 10 * LIMIT / STATEMENT, "never refused");
    };
    assert!(
        matches!(&refusal, AuditError::Unavailable(m) if m.contains("bytes of records behind")),
        "{refusal}"
    );
    assert!(
        accepted >= LIMIT / (STATEMENT + 4096),
        "refused after {accepted}"
    );
    append_once_taken_again(&log, || large(accepted)).await;
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), accepted as u64 + 1);
}

#[tokio::test]
async fn segments_close_by_age_while_running() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_age_secs = 1;
    let log = AuditLog::open(&cfg).await.unwrap();
    log.append(sample(1, store::now_ms())).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store::list_segment_files(&cfg.dir).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "segment not closed by age"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_chain(&read_segments(&cfg.dir), 1);
    log.shutdown().await;
}

/// Waits (up to 10 s) until the newest checkpoint of the store at `cfg`
/// signs `lines` manifest lines.
async fn wait_until_signed(cfg: &AuditConfig, lines: u64) {
    let key = checkpoint::Signer::load(&cfg.dir.join("keys/checkpoint.key"))
        .unwrap()
        .public();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (newest, _) = checkpoint::newest_valid(&cfg.dir.join("checkpoints"), &key).unwrap();
        if newest.is_some_and(|(_, c)| c.size >= lines) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{lines} lines never signed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Copies a live directory: what a crash at this instant leaves on disk
/// (everything acknowledged is fsynced, so it is in the copy), as long as
/// no segment, entry or checkpoint is being written meanwhile (the copy
/// is made file by file: see `wait_until_signed`).
pub(crate) fn crash_copy(from: &Path, to: &Path) {
    // The background writers may retire a WAL file or rename a segment
    // while `cp` walks the tree; a copy that raced them is retried.
    for _ in 0..5 {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        if status.success() {
            return;
        }
        let _ = std::fs::remove_dir_all(to);
    }
    panic!("could not copy {} five times in a row", from.display());
}

#[tokio::test]
async fn crash_recovery_rebuilds_segments_from_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_records = 20;
    cfg.segment_max_age_secs = 3600;
    let (log, now) = open_with_samples(&cfg, 45).await;
    // Wait for the two full segments, signed (see `wait_until_signed`'s
    // use in the next test); the last 5 records stay in the WAL.
    wait_until_signed(&cfg, 2).await;
    let crashed = tmp.path().join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;

    // What else a crash leaves: a half-written segment and a torn WAL frame.
    let day = segment::day_of(now);
    std::fs::write(
        crashed.join(format!("records/date={day}/seg-x.parquet.tmp")),
        b"PAR1 half",
    )
    .unwrap();
    let (_, _, last_wal) = wal::list(&crashed.join("wal")).unwrap().pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last_wal)
        .unwrap();
    std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2]).unwrap();
    drop(f);

    let cfg2 = AuditConfig {
        dir: crashed.clone(),
        ..cfg.clone()
    };
    let log = AuditLog::open(&cfg2).await.unwrap();
    assert_eq!(log.append(sample(99, now)).await.unwrap(), 46);
    log.shutdown().await;
    assert_chain(&read_segments(&crashed), 46);
    assert!(!crashed
        .join(format!("records/date={day}/seg-x.parquet.tmp"))
        .exists());
}

// A copy of the live directory reads through the page cache: it is what a
// crash or kill -9 of the daemon leaves (not a crash of the host, which
// `buffered` durability may lose the last sync's worth of).
#[tokio::test]
async fn buffered_mode_keeps_every_acknowledged_record_through_a_daemon_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.durability = DurabilityMode::Buffered;
    cfg.segment_max_records = 20;
    cfg.segment_max_age_secs = 3600;
    let (log, now) = open_with_samples(&cfg, 45).await;
    // The copy is made file by file: taken while the segment thread writes
    // a segment, its entry and their checkpoint, it could hold a newer
    // checkpoint than manifest, which no crash leaves. The two full
    // segments are signed first; the last 5 records are in the WAL only.
    wait_until_signed(&cfg, 2).await;
    let crashed = tmp.path().join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;

    let cfg2 = AuditConfig {
        dir: crashed.clone(),
        ..cfg.clone()
    };
    let log = AuditLog::open(&cfg2).await.unwrap();
    assert_eq!(log.append(sample(99, now)).await.unwrap(), 46);
    log.shutdown().await;
    assert_chain(&read_segments(&crashed), 46);
    let cfg: AuditConfig = toml::from_str("dir = \"x\"\ndurability = \"buffered\"").unwrap();
    assert_eq!(cfg.durability, DurabilityMode::Buffered);
}

/// A record the WAL could not read back is refused, not acknowledged and
/// then lost (with everything after it) at the next replay; the records
/// around it keep their sequence and survive a crash.
#[tokio::test]
async fn a_record_too_large_for_a_wal_frame_is_refused_and_nothing_else_is_lost() {
    for durability in [DurabilityMode::Strict, DurabilityMode::Buffered] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.durability = durability;
        cfg.segment_max_age_secs = 3600;
        let (log, now) = open_with_samples(&cfg, 2).await;
        let mut huge = sample(2, now);
        huge.query_info_query_string = "x".repeat(wal::MAX_FRAME as usize);
        let err = log.append(huge.clone()).await.unwrap_err();
        assert!(matches!(err, AuditError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("too large"), "{err}");
        // Refused before it is queued, lazily as well.
        let err = log.submit_lazy(huge).await.unwrap_err();
        assert!(matches!(err, AuditError::TooLarge { .. }), "{err}");
        assert_eq!(log.append(sample(3, now)).await.unwrap(), 3);

        let crashed = tmp.path().join("crashed");
        crash_copy(&cfg.dir, &crashed);
        log.shutdown().await;
        let log = AuditLog::open(&AuditConfig {
            dir: crashed.clone(),
            ..cfg.clone()
        })
        .await
        .unwrap();
        assert_eq!(
            log.append(sample(4, now)).await.unwrap(),
            4,
            "{durability:?}"
        );
        log.shutdown().await;
        assert_chain(&read_segments(&crashed), 4);
    }
}

#[tokio::test]
async fn config_with_only_dir_uses_defaults() {
    let cfg: AuditConfig = toml::from_str("dir = \"/var/lib/tollgate/audit\"").unwrap();
    assert_eq!(cfg.segment_max_age_secs, 5);
    assert_eq!(cfg.segment_max_records, 100_000);
    assert_eq!(cfg.durability, DurabilityMode::ReadParallel);
    assert!(cfg.signing_key.is_none());
    assert!(toml::from_str::<AuditConfig>("dir = \"x\"\nbogus = 1").is_err());
}

#[tokio::test]
async fn submit_chains_in_call_order_and_resolves_once_in_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_age_secs = 3600;
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let a = log.submit(sample(0, now));
    let b = log.submit(sample(1, now));
    let c = log.submit(sample(2, now));
    assert_eq!(c.await.unwrap(), 3);
    assert_eq!(a.await.unwrap(), 1);
    assert_eq!(b.await.unwrap(), 2);
    // Resolved means on disk: the WAL holds all three, chained.
    let records = wal::read_all(&cfg.dir.join("wal")).unwrap().records;
    assert_chain(&records, 3);
    assert_eq!(records[1].request_uid, "req-1");
    log.shutdown().await;
}

#[tokio::test]
async fn append_after_shutdown_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let other = log.clone();
    log.shutdown().await;
    let err = other.append(sample(0, store::now_ms())).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err}");
}

#[test]
fn only_read_only_statements_may_go_before_durable_and_never_in_strict_mode() {
    assert!(DurabilityMode::ReadParallel.may_forward_before_durable(true));
    assert!(!DurabilityMode::ReadParallel.may_forward_before_durable(false));
    assert!(!DurabilityMode::Strict.may_forward_before_durable(true));
    assert!(!DurabilityMode::Strict.may_forward_before_durable(false));
    assert!(DurabilityMode::Buffered.may_forward_before_durable(true));
    assert!(!DurabilityMode::Buffered.may_forward_before_durable(false));
    let cfg: AuditConfig = toml::from_str("dir = \"x\"\ndurability = \"strict\"").unwrap();
    assert_eq!(cfg.durability, DurabilityMode::Strict);
}

#[tokio::test]
async fn idle_store_keeps_signing_fresh_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.checkpoint_interval_secs = 1;
    cfg.segment_max_age_secs = 1;
    let log = AuditLog::open(&cfg).await.unwrap();
    log.append(sample(0, store::now_ms())).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    log.shutdown().await;
    let key = checkpoint::Verifier::load(&cfg.dir.join("keys/checkpoint.key.pub")).unwrap();
    let cps: Vec<checkpoint::Checkpoint> = checkpoint::list(&cfg.dir.join("checkpoints"))
        .unwrap()
        .iter()
        .map(|(_, p)| checkpoint::open_note(&std::fs::read_to_string(p).unwrap(), &key).unwrap())
        .collect();
    // Per tree size: the first checkpoint, plus at most the newest idle
    // one; the idle ones in between were written, then pruned.
    for size in [0u64, 1] {
        let n = cps.iter().filter(|c| c.size == size).count();
        assert!((1..=2).contains(&n), "size {size}: {cps:?}");
    }
    let ones: Vec<_> = cps.iter().filter(|c| c.size == 1).collect();
    assert_eq!(
        ones.len(),
        2,
        "an idle checkpoint after the segment: {cps:?}"
    );
    assert!(ones[0].time_ms < ones[1].time_ms);
    let last = cps.last().unwrap().counter.unwrap();
    assert!(
        last > cps.len() as u64,
        "some idle checkpoints were pruned: {cps:?}"
    );
}

#[tokio::test]
async fn auditor_group_owns_every_file_and_directory() {
    use std::os::unix::fs::MetadataExt;
    // A group that is not the process's own (new files get that one
    // without any chown, and the check would pass whatever the store
    // does): as root any group works; otherwise one of the supplementary
    // groups, which a process may give its files.
    // SAFETY: getegid has no preconditions.
    let own = unsafe { libc::getegid() };
    let candidates: Vec<libc::gid_t> = if unsafe { libc::geteuid() } == 0 {
        ["nogroup", "daemon", "adm", "users"]
            .iter()
            .filter_map(|n| {
                let c = std::ffi::CString::new(*n).unwrap();
                // SAFETY: a NUL-terminated name; the entry is read at once.
                let gr = unsafe { libc::getgrnam(c.as_ptr()) };
                (!gr.is_null()).then(|| unsafe { (*gr).gr_gid })
            })
            .collect()
    } else {
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: the buffer holds as many ids as its length says.
        let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
        groups.truncate(usize::try_from(n).unwrap_or(0));
        groups
    };
    let Some(gid) = candidates.into_iter().find(|&g| g != own) else {
        if std::env::var_os("TOLLGATE_REQUIRE_PRIVILEGED").is_some() {
            panic!("no group but the process's own to test the auditor group with");
        }
        eprintln!("SKIPPED auditor_group_owns_every_file_and_directory: no group but the process's own (run as root, or in a supplementary group)");
        return;
    };
    // SAFETY: the entry is read at once.
    let gr = unsafe { libc::getgrgid(gid) };
    assert!(!gr.is_null(), "group {gid} has no name");
    let name = unsafe { std::ffi::CStr::from_ptr((*gr).gr_name) }
        .to_str()
        .unwrap()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.auditor_group = Some(name);
    let log = AuditLog::open(&cfg).await.unwrap();
    log.append(sample(0, store::now_ms())).await.unwrap();
    log.shutdown().await;
    let mut checked = 0;
    let mut stack = vec![cfg.dir.clone()];
    while let Some(p) = stack.pop() {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.gid(), gid, "{}", p.display());
        checked += 1;
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(checked > 8);
}

/// Records chained on from `prev` (sequence, hash), as anyone who can
/// write the WAL can make them: the chain needs no key.
fn forged_frames(prev: (u64, String), n: usize, now: i64) -> (Vec<u8>, Vec<AuditRecord>) {
    let (mut sequence, mut prev_hash) = prev;
    let mut bytes = Vec::new();
    let mut records = Vec::new();
    for i in 0..n {
        let mut r = sample(1000 + i, now);
        r.query_info_query_string = "forged".into();
        sequence += 1;
        r.sequence = sequence;
        r.prev_record_hash = prev_hash.clone();
        r.record_hash = hex::encode(wal::encode_frame(&r, &mut bytes));
        prev_hash = r.record_hash.clone();
        records.push(r);
    }
    (bytes, records)
}

/// What reconciliation takes from a WAL: the sealed records, not the
/// ones past the last seal (never acknowledged, or forged by anyone who
/// can write the file: the chain needs no key).
#[tokio::test]
async fn wal_records_are_the_sealed_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_age_secs = 3600;
    let (log, now) = open_with_samples(&cfg, 3).await;
    let crashed = tmp.path().join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    let sealed = wal_records(&crashed).unwrap();
    assert_eq!(
        sealed.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let tip = sealed.last().unwrap();
    let (bytes, _) = forged_frames((tip.sequence, tip.record_hash.clone()), 2, now);
    std::fs::write(
        crashed
            .join("wal")
            .join(wal::file_name(99, tip.sequence + 1)),
        &bytes,
    )
    .unwrap();
    let read = wal::read_all(&crashed.join("wal")).unwrap().records;
    assert_eq!(read.len(), 5, "the forged frames are in the WAL");
    let taken = wal_records(&crashed).unwrap();
    assert_eq!(
        taken.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn records_forged_into_the_wal_are_not_replayed_into_signed_segments() {
    for foreign_seal in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let (log, now) = open_with_samples(&cfg, 5).await;
        log.shutdown().await;
        // A clean shutdown leaves the WAL empty; the manifest says where
        // the chain ends.
        let (manifest, _) = manifest::Manifest::read(&cfg.dir).unwrap();
        let last = manifest.last_segment().unwrap();
        let (mut bytes, forged) =
            forged_frames((last.last_seq, last.last_record_hash.clone()), 3, now);
        if foreign_seal {
            // Sealed, but with a key that is not the daemon's.
            let other = checkpoint::Signer::generate("someone-else").wal_seal_key();
            let tip = forged.last().unwrap();
            let hash: [u8; 32] = hex::decode(&tip.record_hash).unwrap().try_into().unwrap();
            wal::append_seal(&mut bytes, &other, tip.sequence, &hash);
        }
        let path = cfg
            .dir
            .join("wal")
            .join(wal::file_name(99, last.last_seq + 1));
        std::fs::write(&path, &bytes).unwrap();

        let log = AuditLog::open(&cfg).await.unwrap();
        assert_eq!(
            log.append(sample(9, now)).await.unwrap(),
            last.last_seq + 1,
            "foreign seal: {foreign_seal}"
        );
        log.shutdown().await;
        let rows = read_segments(&cfg.dir);
        assert!(rows.iter().all(|r| r.query_info_query_string != "forged"));
        assert_chain(&rows, last.last_seq + 1);
        // Kept as evidence, and verify says so: records with no seal are
        // what a crash can leave too (a note); a seal that does not match
        // is not (a problem).
        if foreign_seal {
            assert_set_aside_and_flagged(&cfg.dir, &path);
        } else {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".unsealed");
            assert!(std::path::Path::new(&aside).exists());
            let key = checkpoint::Verifier::load(&cfg.dir.join("keys/checkpoint.key.pub")).unwrap();
            let r = verify::verify(&cfg.dir, &key);
            assert!(r.ok, "{:#?}", r.problems);
            assert!(
                r.notes.iter().any(|n| n.contains("no seal covers")),
                "{:?}",
                r.notes
            );
        }
    }
}

#[tokio::test]
async fn a_wal_record_edited_after_a_crash_is_not_replayed_and_is_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, path) = crashed_with_five_in_the_wal(tmp.path()).await;
    // The last record is rewritten with its chain recomputed; its seal,
    // which needs the key, is left as it was.
    let bytes = std::fs::read(&path).unwrap();
    let contents = wal::read_file(&path).unwrap();
    let mut edited = contents.records[4].clone();
    edited.query_info_query_string = "SELECT 'nothing to see'".into();
    let at = record_frames(&bytes)[4];
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut forged = bytes[..at].to_vec();
    edited.record_hash = hex::encode(wal::encode_frame(&edited, &mut forged));
    forged.extend_from_slice(&bytes[at + wal::frame_len(len)..]);
    std::fs::write(&path, &forged).unwrap();
    assert_eq!(wal::read_file(&path).unwrap().records[4], edited);

    // The four records before it are replayed; the chain goes on from them.
    assert_eq!(append_after_recovery(&cfg).await, 5);
    let rows = read_segments(&cfg.dir);
    assert!(rows
        .iter()
        .all(|r| r.query_info_query_string != edited.query_info_query_string));
    assert_set_aside_and_flagged(&cfg.dir, &path);
}

#[tokio::test]
async fn second_store_on_the_same_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let err = AuditLog::open(&cfg).await.err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
    log.shutdown().await;
    // Released at shutdown: reopening works at once.
    let log = AuditLog::open(&cfg).await.unwrap();
    log.shutdown().await;
}

/// Where each record frame of a WAL file starts (seal frames, which have
/// the top bit of their length set, skipped).
pub(crate) fn record_frames(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + wal::HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        if len == 0 {
            break;
        }
        if len & (1 << 31) == 0 {
            out.push(off);
        }
        off += wal::frame_len((len & !(1 << 31)) as usize);
    }
    out
}

#[tokio::test]
async fn wal_that_breaks_the_chain_is_kept_aside_and_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, path) = crashed_with_five_in_the_wal(tmp.path()).await;
    // Damage the third record of the only WAL file.
    let mut bytes = std::fs::read(&path).unwrap();
    let off = record_frames(&bytes)[2];
    bytes[off + 30] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    // The two intact records were recovered; the chain goes on after them.
    assert_eq!(append_after_recovery(&cfg).await, 3);
    assert_set_aside_and_flagged(&cfg.dir, &path);
}

/// A crash copy of a store whose 5 records are all still in its one WAL
/// file: the copy's config, and the file.
async fn crashed_with_five_in_the_wal(tmp: &Path) -> (AuditConfig, std::path::PathBuf) {
    let mut cfg = config(tmp);
    cfg.segment_max_age_secs = 3600;
    let (log, _) = open_with_samples(&cfg, 5).await;
    let crashed = tmp.join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    let (_, _, path) = wal::list(&crashed.join("wal")).unwrap().pop().unwrap();
    (
        AuditConfig {
            dir: crashed,
            ..cfg
        },
        path,
    )
}

/// Opens the store (recovering it), appends one record and shuts down:
/// the record's sequence.
async fn append_after_recovery(cfg: &AuditConfig) -> u64 {
    let log = AuditLog::open(cfg).await.unwrap();
    let sequence = log.append(sample(9, store::now_ms())).await.unwrap();
    log.shutdown().await;
    sequence
}

/// Recovery set `wal_file` aside as `.corrupt`, and verify flags it.
fn assert_set_aside_and_flagged(dir: &Path, wal_file: &Path) {
    let mut aside = wal_file.as_os_str().to_owned();
    aside.push(".corrupt");
    assert!(std::path::Path::new(&aside).exists());
    let key = checkpoint::Verifier::load(&dir.join("keys/checkpoint.key.pub")).unwrap();
    let r = verify::verify(dir, &key);
    assert!(!r.ok);
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == verify::Kind::WalCorrupt && p.file.ends_with(".corrupt")),
        "{:#?}",
        r.problems
    );
}

/// A crash copy with 20 records in a segment and 5 only in the WAL.
async fn crashed_with_wal_tail(tmp: &Path) -> AuditConfig {
    let mut cfg = config(tmp);
    cfg.segment_max_records = 20;
    cfg.segment_max_age_secs = 3600;
    let (log, _) = open_with_samples(&cfg, 25).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store::list_segment_files(&cfg.dir).unwrap().is_empty()
        || wal::list(&cfg.dir.join("wal")).unwrap().len() != 1
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let crashed = tmp.join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    AuditConfig {
        dir: crashed,
        ..cfg
    }
}

#[tokio::test]
async fn crash_between_segment_rename_and_manifest_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crashed_with_wal_tail(tmp.path()).await;
    // The crash left the next segment renamed into place and half of its
    // manifest line written.
    let day = segment::day_of(store::now_ms());
    let orphan = cfg.dir.join(segment::relative_path(&day, 21, 25));
    std::fs::write(&orphan, b"not what the WAL says").unwrap();
    let mut m = std::fs::OpenOptions::new()
        .append(true)
        .open(cfg.dir.join(manifest::FILE))
        .unwrap();
    std::io::Write::write_all(&mut m, b"{\"kind\":\"segment\",\"path\":\"rec").unwrap();
    drop(m);

    let log = AuditLog::open(&cfg).await.unwrap();
    assert_eq!(log.append(sample(0, store::now_ms())).await.unwrap(), 26);
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), 26);
    assert_verifies_clean(&cfg.dir);
}

/// A closed store of 15 records in three segments of 5.
async fn closed_in_three_segments(tmp: &Path) -> AuditConfig {
    let mut cfg = config(tmp);
    cfg.segment_max_records = 5;
    let log = AuditLog::open(&cfg).await.unwrap();
    for i in 0..15 {
        log.append(sample(i, store::now_ms())).await.unwrap();
    }
    log.shutdown().await;
    cfg
}

/// `audit verify` with the directory's own public key finds no problem.
pub(crate) fn assert_verifies_clean(dir: &Path) {
    let key = checkpoint::Verifier::load(&dir.join("keys/checkpoint.key.pub")).unwrap();
    let r = verify::verify(dir, &key);
    assert!(r.ok, "{:#?}", r.problems);
}

#[tokio::test]
async fn manifest_damaged_before_its_last_line_stops_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = closed_in_three_segments(tmp.path()).await;
    let path = cfg.dir.join(manifest::FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("{\"kind\"", "{\"kinx\"", 1)).unwrap();
    let err = AuditLog::open(&cfg).await.err().unwrap();
    assert!(err.to_string().contains("line 1 is damaged"), "{err}");
}

#[tokio::test]
async fn a_torn_last_manifest_line_is_dropped_and_the_chain_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = closed_in_three_segments(tmp.path()).await;
    // What a kill -9 in the middle of a manifest append leaves: the new
    // entry cut before its newline.
    let path = cfg.dir.join(manifest::FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"kind\":\"segment\",\"first_se");
    std::fs::write(&path, text).unwrap();

    let log = AuditLog::open(&cfg).await.unwrap();
    assert_eq!(log.append(sample(99, store::now_ms())).await.unwrap(), 16);
    log.shutdown().await;
    assert_chain(&read_segments(&cfg.dir), 16);
    assert_verifies_clean(&cfg.dir);
}

#[tokio::test]
async fn a_damaged_whole_last_manifest_line_stops_the_store_and_keeps_its_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = closed_in_three_segments(tmp.path()).await;
    let segments_before = store::list_segment_files(&cfg.dir).unwrap();
    // One flipped byte in a line that was written whole (and signed): not
    // a torn append, so not something to drop.
    let path = cfg.dir.join(manifest::FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.trim_end().rfind('\n').map_or(0, |i| i + 1);
    let mut bytes = text.into_bytes();
    assert_eq!(bytes[last], b'{');
    bytes[last] = b'[';
    std::fs::write(&path, &bytes).unwrap();

    let err = AuditLog::open(&cfg).await.err().unwrap();
    assert!(err.to_string().contains("is damaged"), "{err}");
    assert_eq!(
        store::list_segment_files(&cfg.dir).unwrap(),
        segments_before
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test]
async fn policy_fields_round_trip_through_segments_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let mut r = sample(1, store::now_ms());
    r.query_info_kind = "write".into();
    r.query_info_tables_read = vec!["public.customers".into()];
    r.query_info_tables_written = vec!["public.orders".into(), "audit.log".into()];
    r.query_info_parameters = "[\"42\",null]".into();
    r.intent = "refund order 1001".into();
    r.actor_tollgate_roles = ["support".to_string()].into();
    r.masked_columns = vec!["email".into()];
    log.append(r.clone()).await.unwrap();
    log.shutdown().await;
    let got = read_segments(&cfg.dir);
    assert_eq!(strip(got[0].clone()), r);
    let key = checkpoint::Verifier::load(&cfg.dir.join("keys/checkpoint.key.pub")).unwrap();
    assert!(verify::verify(&cfg.dir, &key).ok);
}

/// Sessions on any thread hold clones of one handle: every clone writes
/// to the one store, in one chain.
#[tokio::test]
async fn clones_of_the_audit_log_share_one_store() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<AuditLog>();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let clone = log.clone();
    let now = store::now_ms();
    let first = log.append(sample(0, now)).await.unwrap();
    let from_another_thread = tokio::spawn(async move { clone.append(sample(1, now)).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from_another_thread, first + 1, "one sequence, one chain");
    log.shutdown().await;
    let key = checkpoint::Verifier::load(&cfg.dir.join("keys/checkpoint.key.pub")).unwrap();
    let report = verify::verify(&cfg.dir, &key);
    assert!(report.ok, "{:#?}", report.problems);
    assert_eq!(report.records, 2);
}

#[test]
fn documented_audit_section_parses() {
    // The example in docs/audit-schema.md, verbatim.
    let doc = include_str!("../../../docs/audit-schema.md");
    let start = doc.find("```toml\n[audit]\n").unwrap() + "```toml\n[audit]\n".len();
    let body = &doc[start..start + doc[start..].find("```").unwrap()];
    let cfg: AuditConfig = toml::from_str(body).unwrap();
    assert_eq!(cfg.dir, std::path::Path::new("/var/lib/tollgate/audit"));
    assert_eq!(cfg.retention_days, Some(400));
    assert_eq!(cfg.auditor_group.as_deref(), Some("audit"));
    assert_eq!(cfg.origin.as_deref(), Some("tollgate/db-gw-1"));
    assert_eq!(cfg.checkpoint_interval_secs, 60);
    assert_eq!(cfg.durability, DurabilityMode::ReadParallel);
}

/// Checks every segment of `dir` against its manifest entry and the file's
/// own metadata: rows in (time, sequence) order, first and last sequence,
/// count, links, Merkle root over sequence order, time range, path, and the
/// link column stored only in the first row by sequence; then verify.
fn check_segments_against_manifest(dir: &Path, n: u64) {
    use arrow_array::Array;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let all = read_segments(dir);
    assert_chain(&all, n);
    let (m, bad) = manifest::Manifest::read(dir).unwrap();
    assert!(bad.is_none());
    let mut segs = 0;
    for e in &m.entries {
        let manifest::Entry::Segment(s) = e else {
            continue;
        };
        segs += 1;
        let path = dir.join(&s.path);
        let rows = segment::read_file(&path).unwrap();
        assert!(
            rows.windows(2)
                .all(|w| (w[0].time, w[0].sequence) < (w[1].time, w[1].sequence)),
            "{} not in (time, sequence) order",
            s.path
        );
        let mut by_seq = rows.clone();
        by_seq.sort_by_key(|r| r.sequence);
        assert_eq!(by_seq[0].sequence, s.first_seq);
        assert_eq!(by_seq.last().unwrap().sequence, s.last_seq);
        assert_eq!(s.last_seq - s.first_seq + 1, rows.len() as u64);
        assert_eq!(rows.len() as u64, s.record_count);
        assert_eq!(by_seq[0].prev_record_hash, s.first_prev_hash);
        assert_eq!(by_seq.last().unwrap().record_hash, s.last_record_hash);
        let leaves: Vec<_> = by_seq
            .iter()
            .map(|r| merkle::leaf_hash(&hex::decode(&r.record_hash).unwrap()))
            .collect();
        assert_eq!(
            hex::encode(merkle::root_from_leaf_hashes(&leaves)),
            s.merkle_root
        );
        assert_eq!(rows.iter().map(|r| r.time).min().unwrap(), s.first_time);
        assert_eq!(rows.iter().map(|r| r.time).max().unwrap(), s.last_time);
        assert_eq!(
            s.path,
            segment::relative_path(&segment::day_of(by_seq[0].time), s.first_seq, s.last_seq)
        );
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .clone();
        let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
        assert_eq!(
            get("tollgate.first_sequence"),
            Some(s.first_seq.to_string())
        );
        assert_eq!(get("tollgate.last_sequence"), Some(s.last_seq.to_string()));
        // The raw link column: only the first row by sequence holds a value.
        let rdr = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        let mut nonnull = Vec::new();
        let mut row = 0;
        for b in rdr {
            let b = b.unwrap();
            let c = b.column_by_name("prev_record_hash").unwrap();
            for i in 0..b.num_rows() {
                if !c.is_null(i) {
                    nonnull.push(rows[row + i].sequence);
                }
            }
            row += b.num_rows();
        }
        assert_eq!(nonnull, vec![s.first_seq], "{}", s.path);
    }
    assert!(segs > 0);
    let key = checkpoint::Verifier::load(&dir.join("keys/checkpoint.key.pub")).unwrap();
    let r = verify::verify(dir, &key);
    assert!(r.ok, "{:#?}", r.problems);
}

/// Waits until the segment thread of the store at `dir` is idle: no
/// unfinished segment file, as many segment files as manifest entries, and both
/// unchanged for a second.
async fn settle_segments(dir: &Path) {
    let state = || {
        let files = store::list_segment_files(dir).unwrap_or_default().len();
        let entries = manifest::Manifest::read(dir)
            .map(|(m, _)| {
                m.entries
                    .iter()
                    .filter(|e| matches!(e, manifest::Entry::Segment(_)))
                    .count()
            })
            .unwrap_or(usize::MAX);
        let unfinished = walkdir_has_tmp(&dir.join("records"));
        (files, entries, unfinished)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = state();
    let mut same_since = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = state();
        if now != last {
            (last, same_since) = (now, std::time::Instant::now());
        } else if now.0 == now.1
            && !now.2
            && same_since.elapsed() >= std::time::Duration::from_secs(1)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segments never settled: {now:?}"
        );
    }
}

/// Whether any file under `dir` is unfinished (`.tmp`).
fn walkdir_has_tmp(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let path = e.path();
            if path.is_dir() {
                walkdir_has_tmp(&path)
            } else {
                path.extension().is_some_and(|x| x == "tmp")
            }
        })
}

/// Times that tie, step forward and jump back (a wall clock), from `start`.
fn wall_clock_times(seed: u64, n: usize, start: i64) -> Vec<i64> {
    let mut x = seed;
    let mut t = start;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Ties, small steps forward, now and then a jump back.
            t += match x % 10 {
                0..=3 => 0,
                4..=7 => (x >> 8) as i64 % 5,
                8 => -((x >> 8) as i64 % 20),
                _ => -((x >> 8) as i64 % 3000),
            };
            t
        })
        .collect()
}

#[tokio::test]
async fn segments_stay_sorted_and_match_the_manifest_when_the_clock_goes_back_live_and_replayed() {
    const MIDNIGHT: i64 = 1_764_201_600_000;
    for seed in 1..=3u64 {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.segment_max_records = [7, 333, 100_000][seed as usize - 1];
        cfg.segment_max_age_secs = 3600;
        let n1 = 700;
        let times = wall_clock_times(seed * 7919, 1500, MIDNIGHT - 400 - seed as i64 * 37);
        let log = AuditLog::open(&cfg).await.unwrap();
        for (i, &t) in times[..n1].iter().enumerate() {
            log.append(sample(i, t)).await.unwrap();
        }
        // A crash copy: what is still in the WAL is replayed. The segment
        // thread settles first (a copy of a live directory is not a
        // snapshot): no file half-written, every file in the manifest, and
        // nothing changing for a second.
        settle_segments(&cfg.dir).await;
        let crashed = tmp.path().join("crashed");
        crash_copy(&cfg.dir, &crashed);
        for (i, &t) in times[n1..].iter().enumerate() {
            log.append(sample(i, t)).await.unwrap();
        }
        log.shutdown().await;
        check_segments_against_manifest(&cfg.dir, times.len() as u64);
        let cfg2 = AuditConfig {
            dir: crashed.clone(),
            ..cfg.clone()
        };
        let log = AuditLog::open(&cfg2).await.unwrap();
        for (i, &t) in times[n1..].iter().enumerate() {
            log.append(sample(i, t)).await.unwrap();
        }
        log.shutdown().await;
        check_segments_against_manifest(&crashed, times.len() as u64);
    }
}

#[tokio::test]
async fn a_checkpoint_never_signs_a_time_before_the_last_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (log, now) = open_with_samples(&cfg, 3).await;
    log.shutdown().await;
    // The last checkpoint was signed while the wall clock ran ten minutes
    // ahead; the clock has been stepped back since.
    let signer = checkpoint::Signer::load(&cfg.dir.join("keys/checkpoint.key")).unwrap();
    let (manifest, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    let checkpoints = cfg.dir.join("checkpoints");
    let ahead = now + 600_000;
    checkpoint::write(
        &checkpoints,
        &fsutil::Perms::for_group(None).unwrap(),
        &signer,
        cfg.origin.as_deref().unwrap_or(&signer.name),
        &manifest.into_appender(),
        checkpoint::last_counter_and_time(&checkpoints, &signer.public())
            .unwrap()
            .0
            + 1,
        ahead,
    )
    .unwrap();

    let log = AuditLog::open(&cfg).await.unwrap();
    log.append(sample(9, store::now_ms())).await.unwrap();
    log.shutdown().await;
    assert!(
        checkpoint::last_counter_and_time(&checkpoints, &signer.public())
            .unwrap()
            .1
            .unwrap()
            >= ahead
    );
    let r = verify::verify(&cfg.dir, &signer.public());
    assert!(r.ok, "{:#?}", r.problems);

    // A checkpoint dated further ahead than a clock step is not followed:
    // later ones sign the real time, and verify shows the regression.
    let far_ahead = store::now_ms() + 30 * 86_400_000;
    checkpoint::write(
        &checkpoints,
        &fsutil::Perms::for_group(None).unwrap(),
        &signer,
        cfg.origin.as_deref().unwrap_or(&signer.name),
        &manifest::Manifest::read(&cfg.dir)
            .unwrap()
            .0
            .into_appender(),
        checkpoint::last_counter_and_time(&checkpoints, &signer.public())
            .unwrap()
            .0
            + 1,
        far_ahead,
    )
    .unwrap();
    let log = AuditLog::open(&cfg).await.unwrap();
    log.shutdown().await;
    assert!(
        checkpoint::last_counter_and_time(&checkpoints, &signer.public())
            .unwrap()
            .1
            .unwrap()
            < far_ahead
    );
    let r = verify::verify(&cfg.dir, &signer.public());
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == verify::Kind::CheckpointRegressed),
        "{:#?}",
        r.problems
    );
}

/// A lazy record is written within LAZY_WAIT of its arrival even while
/// more lazy records keep coming (a flood of refused connections): the
/// wait for an urgent record to share the sync does not start over with
/// each one.
#[tokio::test]
async fn lazy_records_are_written_soon_while_more_keep_coming() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let first = log.submit_lazy(sample(0, now));
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(first.await);
    });
    // One every 5 ms (well inside the 20 ms wait) for two seconds.
    let mut written_while_coming = false;
    for i in 1..400 {
        // Not awaited: a session drops a lazy record's result likewise.
        drop(log.submit_lazy(sample(i, now + i as i64)));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        if let Ok(result) = rx.try_recv() {
            result.expect("the first lazy record written");
            written_while_coming = true;
            break;
        }
    }
    assert!(
        written_while_coming,
        "the first lazy record waited for the stream of lazy records to stop"
    );
    log.shutdown().await;
}

/// Settings that would make the store other than it says are refused
/// before anything starts: retention of 0 days, timings past their
/// bounds, a signing key any user of the host may read.
#[test]
fn settings_that_would_undo_what_the_store_promises_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = config(tmp.path());
    super::check_config(&good).expect("the defaults");
    let refused = |change: &dyn Fn(&mut super::AuditConfig), key: &str| {
        let mut cfg = good.clone();
        change(&mut cfg);
        let err = super::check_config(&cfg).expect_err(key);
        assert!(err.to_string().contains(key), "{key}: {err:#}");
    };
    refused(&|c| c.retention_days = Some(0), "audit.retention_days");
    refused(
        &|c| c.checkpoint_interval_secs = 0,
        "audit.checkpoint_interval_secs",
    );
    refused(
        &|c| c.checkpoint_interval_secs = 3601,
        "audit.checkpoint_interval_secs",
    );
    refused(
        &|c| c.segment_max_age_secs = 86_401,
        "audit.segment_max_age_secs",
    );
    refused(
        &|c| c.buffered_sync_interval_ms = 1001,
        "audit.buffered_sync_interval_ms",
    );
    refused(&|c| c.segment_max_records = 0, "audit.segment_max_records");
    refused(
        &|c| c.segment_max_age_secs = 0,
        "audit.segment_max_age_secs",
    );
    refused(
        &|c| c.buffered_sync_interval_ms = 0,
        "audit.buffered_sync_interval_ms",
    );
    refused(
        &|c| c.segment_max_records = 10_000_001,
        "audit.segment_max_records",
    );
    let mut kept = good.clone();
    kept.retention_days = Some(1);
    kept.checkpoint_interval_secs = 3600;
    super::check_config(&kept).expect("the bounds themselves");
    // A signing key readable by every user of the host, and the same key
    // kept to its owner.
    {
        use std::os::unix::fs::PermissionsExt;
        let key = tmp.path().join("signing.key");
        super::keygen(&key, "test-key").expect("keygen");
        let mut with_key = good.clone();
        with_key.signing_key = Some(key.clone());
        super::check_config(&with_key).expect("a key kept to its owner");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = super::check_config(&with_key).expect_err("a key anyone may read");
        assert!(err.to_string().contains("audit.signing_key"), "{err:#}");
        assert!(err.to_string().contains("any user of the host"), "{err:#}");
    }
}

/// `[audit] origin` is the first line of every checkpoint, and the
/// evidence stream's is it followed by `/evidence`: one that is empty,
/// holds a line break, or already ends so is refused before anything
/// starts.
#[test]
fn an_origin_that_is_no_line_or_looks_like_the_evidence_streams_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    for bad in ["", "prod\nsecond line", "prod/evidence"] {
        cfg.origin = Some(bad.into());
        let err = super::check_config(&cfg).expect_err(bad);
        assert!(err.to_string().contains("audit.origin"), "{err:#}");
    }
    cfg.origin = Some("tollgate-prod/eu-1".into());
    super::check_config(&cfg).expect("a plain origin");
}
