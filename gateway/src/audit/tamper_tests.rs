//! Tamper suite: each test damages an audit directory the way an attacker
//! or a fault would, and checks that verify finds it and says where.

use std::{fs, path::Path};

use super::{
    checkpoint::Verifier,
    store,
    tests::{config, crash_copy, open_with_samples, sample},
    verify::{verify, Kind, Report},
    *,
};

const DAY_MS: i64 = 86_400_000;

/// A closed directory with 45 records in 5 segments of 10, 10, 10, 10, 5.
async fn build(tmp: &Path) -> AuditConfig {
    let mut cfg = config(tmp);
    cfg.segment_max_records = 10;
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    for i in 0..45 {
        log.append(sample(i, now + i as i64)).await.unwrap();
    }
    log.shutdown().await;
    cfg
}

/// Deletes every checkpoint that signs more than `lines` manifest lines.
fn delete_checkpoints_signing_more_than(cfg: &AuditConfig, lines: u64) {
    for (_, p) in checkpoint::list(&cfg.dir.join("checkpoints")).unwrap() {
        let text = fs::read_to_string(&p).unwrap();
        let size: u64 = text.lines().nth(1).unwrap().parse().unwrap();
        if size > lines {
            fs::remove_file(&p).unwrap();
        }
    }
}

/// Whether verify's report has a note containing `text`.
fn has_note(r: &Report, text: &str) -> bool {
    r.notes.iter().any(|n| n.contains(text))
}

fn key(cfg: &AuditConfig) -> Verifier {
    Verifier::load(&cfg.dir.join("keys/checkpoint.key.pub")).unwrap()
}

fn segments(cfg: &AuditConfig) -> Vec<String> {
    store::list_segment_files(&cfg.dir).unwrap()
}

/// Rewrites the segment at `path` as valid Parquet after `alter` has
/// changed its rows, as an attacker with write access would; returns the
/// rows written.
fn rewrite_segment(path: &Path, alter: impl FnOnce(&mut Vec<AuditRecord>)) -> Vec<AuditRecord> {
    let mut rows = segment::read_file(path).unwrap();
    alter(&mut rows);
    fs::remove_file(path).unwrap();
    segment::write_file(&fsutil::Perms::default(), path, &rows).unwrap();
    rows
}

fn has(r: &Report, kind: Kind, file: &str, row: Option<u64>) -> bool {
    r.problems
        .iter()
        .any(|p| p.kind == kind && p.file == file && (row.is_none() || p.row == row))
}

#[tokio::test]
async fn untouched_directory_verifies_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.segments, 5);
    assert_eq!(r.records, 45);
    assert_eq!((r.first_sequence, r.last_sequence), (Some(1), Some(45)));
    assert_eq!(r.latest_checkpoint.as_ref().unwrap().tree_size, 5);
}

#[tokio::test]
async fn wrong_public_key_fails_every_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let other = super::checkpoint::Signer::generate("tollgate").public();
    let r = verify(&cfg.dir, &other);
    assert!(!r.ok);
    assert!(r
        .problems
        .iter()
        .any(|p| p.kind == Kind::CheckpointBadSignature));
    assert!(r.problems.iter().any(|p| p.kind == Kind::CheckpointMissing));
}

#[tokio::test]
async fn altered_row_is_located_by_file_and_row() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[1].clone();
    let path = cfg.dir.join(&victim);
    // Re-encoded as valid Parquet: only the content changed.
    let rows = rewrite_segment(&path, |rows| rows[3].actor_user_uid = "someone-else".into());
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let first = &r.problems[0];
    assert_eq!(first.kind, Kind::RecordHashMismatch);
    assert_eq!(first.file, victim);
    assert_eq!(first.row, Some(3));
    assert_eq!(first.sequence, Some(rows[3].sequence));
    assert!(has(&r, Kind::SegmentHashMismatch, &victim, None));
}

#[tokio::test]
async fn rows_out_of_time_order_are_located() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[2].clone();
    let path = cfg.dir.join(&victim);
    // The same records, the same chain and Merkle root: only the order of
    // two rows in the file differs.
    rewrite_segment(&path, |rows| rows.swap(4, 5));
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        has(&r, Kind::SegmentUnsorted, &victim, Some(5)),
        "{:#?}",
        r.problems
    );
    assert!(!r
        .problems
        .iter()
        .any(|p| p.kind == Kind::MerkleRootMismatch));
    // The untouched files are in order.
    assert_eq!(
        r.problems
            .iter()
            .filter(|p| p.kind == Kind::SegmentUnsorted)
            .count(),
        1
    );
}

#[tokio::test]
async fn deleted_segment_is_reported_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[2].clone();
    fs::remove_file(cfg.dir.join(&victim)).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert_eq!(r.problems[0].kind, Kind::SegmentMissing);
    assert_eq!(r.problems[0].file, victim);
    assert_eq!(r.problems[0].sequence, Some(21));
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
}

#[tokio::test]
async fn swapped_segments_are_both_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let s = segments(&cfg);
    let (a, b) = (cfg.dir.join(&s[1]), cfg.dir.join(&s[2]));
    let tmpf = cfg.dir.join("swap");
    fs::rename(&a, &tmpf).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmpf, &b).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert!(has(&r, Kind::SegmentHashMismatch, &s[1], None));
    assert!(has(&r, Kind::SegmentHashMismatch, &s[2], None));
    // The rows themselves say they are in the wrong place.
    assert!(has(&r, Kind::SequenceGap, &s[1], Some(0)));
    assert!(has(&r, Kind::MerkleRootMismatch, &s[1], None));
}

#[tokio::test]
async fn truncated_newest_segment_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let newest = segments(&cfg).pop().unwrap();
    let path = cfg.dir.join(&newest);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert_eq!(r.problems[0].kind, Kind::SegmentUnreadable);
    assert_eq!(r.problems[0].file, newest);
    assert!(has(&r, Kind::SegmentHashMismatch, &newest, None));
}

#[tokio::test]
async fn dropped_manifest_entries_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let mpath = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&mpath).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    fs::write(&mpath, format!("{}\n", kept.join("\n"))).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert!(has(&r, Kind::ManifestTruncated, manifest::FILE, Some(4)));
    let s = segments(&cfg);
    assert!(has(&r, Kind::SegmentUnlisted, &s[3], None));
    assert!(has(&r, Kind::SegmentUnlisted, &s[4], None));

    // A copy deeper under records/, which `records/**/*.parquet` reads.
    let nested = Path::new(&s[0])
        .parent()
        .unwrap()
        .join("more")
        .join("copy.parquet");
    fs::create_dir_all(cfg.dir.join(nested.parent().unwrap())).unwrap();
    fs::copy(cfg.dir.join(&s[0]), cfg.dir.join(&nested)).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        has(&r, Kind::SegmentUnlisted, &nested.to_string_lossy(), None),
        "{:#?}",
        r.problems
    );
    fs::remove_dir_all(cfg.dir.join(nested.parent().unwrap())).unwrap();

    // Deleting the unlisted files too still leaves the signed size behind.
    fs::remove_file(cfg.dir.join(&s[3])).unwrap();
    fs::remove_file(cfg.dir.join(&s[4])).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(has(&r, Kind::ManifestTruncated, manifest::FILE, Some(4)));
}

#[tokio::test]
async fn older_checkpoint_in_place_of_newest_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let cps = checkpoint::list(&cfg.dir.join("checkpoints")).unwrap();
    assert!(cps.len() >= 3);
    let (newest_n, newest) = cps.last().unwrap().clone();
    fs::copy(&cps[1].1, &newest).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let rel = format!("checkpoints/{}", checkpoint::file_name(newest_n));
    assert!(
        has(&r, Kind::CheckpointMisnamed, &rel, None),
        "{:#?}",
        r.problems
    );
    // The manifest tail is then no longer covered by a valid checkpoint.
    assert!(r
        .problems
        .iter()
        .any(|p| p.kind == Kind::ManifestUnsignedTail));
}

#[tokio::test]
async fn deleted_newest_checkpoint_leaves_the_tail_unsigned() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    delete_checkpoints_signing_more_than(&cfg, 3);
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(has(&r, Kind::ManifestUnsignedTail, manifest::FILE, Some(4)));
    // The daemon does not start over it: the records of the lines no
    // checkpoint signs now are no longer in the WAL, and setting the lines
    // aside would take them out of the chain and reuse their numbers.
    let manifest_before = fs::read(cfg.dir.join(manifest::FILE)).unwrap();
    let segments_before = segments(&cfg);
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(
        err.to_string()
            .contains("line 4 lists a segment of records 31-40")
            && err.to_string().contains("nothing was changed"),
        "{err:#}"
    );
    assert_eq!(
        fs::read(cfg.dir.join(manifest::FILE)).unwrap(),
        manifest_before
    );
    assert_eq!(segments(&cfg), segments_before);
    assert!(set_aside_lines(&cfg).is_empty());
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(has(&r, Kind::ManifestUnsignedTail, manifest::FILE, Some(4)));
}

#[tokio::test]
async fn edited_manifest_entry_breaks_the_signed_root() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let mpath = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&mpath).unwrap();
    // Claim the second segment closed at a different time.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[1] = lines[1].replace("\"closed_at\":", "\"closed_at\":1");
    fs::write(&mpath, format!("{}\n", lines.join("\n"))).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r
        .problems
        .iter()
        .any(|p| p.kind == Kind::CheckpointRootMismatch));
}

/// A directory whose last 5 records are only in the WAL (a crash copy).
async fn build_with_wal(tmp: &Path) -> AuditConfig {
    let mut cfg = config(tmp);
    cfg.segment_max_records = 20;
    cfg.segment_max_age_secs = 3600;
    let (log, _) = open_with_samples(&cfg, 25).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while segments(&cfg).is_empty() || !wal_has_only_tail(&cfg.dir) {
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

fn wal_has_only_tail(dir: &Path) -> bool {
    wal::list(&dir.join("wal")).unwrap().len() == 1
}

#[tokio::test]
async fn wal_tail_continuing_the_chain_verifies_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build_with_wal(tmp.path()).await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 20);
    assert_eq!(r.wal_records, 5);
    assert_eq!(r.last_sequence, Some(25));
    // It says what it could not check.
    assert!(
        has_note(&r, "5 records are only in the WAL"),
        "{:?}",
        r.notes
    );
}

#[tokio::test]
async fn flipped_wal_byte_is_located() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build_with_wal(tmp.path()).await;
    let (_, _, path) = wal::list(&cfg.dir.join("wal")).unwrap().pop().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    // Inside the second record's payload.
    let at = super::tests::record_frames(&bytes)[1] + wal::HEADER + 20;
    bytes[at] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let rel = format!("wal/{}", path.file_name().unwrap().to_string_lossy());
    assert_eq!(r.problems[0].kind, Kind::WalCorrupt);
    assert_eq!(r.problems[0].file, rel);
    assert_eq!(r.problems[0].row, Some(1));
}

/// A high bit flipped in a frame's length would point the frame far past
/// the written part of the file, where it used to pass for a write a crash
/// cut short: the records from it on were dropped, unreported. The length
/// has its own checksum: the damage is located, and the daemon's recovery
/// keeps the file aside instead of deleting it.
#[tokio::test]
async fn flipped_wal_length_bit_is_located_not_taken_for_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build_with_wal(tmp.path()).await;
    let (_, _, path) = wal::list(&cfg.dir.join("wal")).unwrap().pop().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    // Bit 25 of the second record's length: 32 MiB further on.
    let at = super::tests::record_frames(&bytes)[1] + 3;
    bytes[at] ^= 0x02;
    fs::write(&path, bytes).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let rel = format!("wal/{}", path.file_name().unwrap().to_string_lossy());
    assert_eq!(r.problems[0].kind, Kind::WalCorrupt, "{:#?}", r.problems);
    assert_eq!(r.problems[0].file, rel);
    assert_eq!(r.problems[0].row, Some(1));

    // Recovery keeps what it cannot read as evidence, and verify still
    // says so.
    let log = AuditLog::open(&cfg).await.unwrap();
    log.shutdown().await;
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    assert!(Path::new(&aside).exists(), "the damaged WAL file is kept");
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        r.problems.iter().any(|p| p.kind == Kind::WalCorrupt),
        "{:#?}",
        r.problems
    );
}

#[tokio::test]
async fn retention_is_a_signed_manifest_entry_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.segment_max_records = 10;
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    for i in 0..30 {
        // The first 20 records are 10 days old.
        let t = if i < 20 { now - 10 * DAY_MS } else { now };
        log.append(sample(i, t)).await.unwrap();
    }
    log.shutdown().await;
    let before = segments(&cfg);
    assert_eq!(before.len(), 3);
    let first_bytes = fs::read(cfg.dir.join(&before[0])).unwrap();

    apply_retention(&cfg, 7, now).unwrap();
    let after = segments(&cfg);
    assert_eq!(after, vec![before[2].clone()]);
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);

    // A removed segment still on disk as it was (a crash between the
    // signed removal and the deletion) is a note; another file in its
    // place, which queries would read, is a problem.
    let removed = cfg.dir.join(&before[0]);
    fs::create_dir_all(removed.parent().unwrap()).unwrap();
    fs::write(&removed, &first_bytes).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert!(has_note(&r, "deletion pending"), "{:?}", r.notes);
    fs::copy(cfg.dir.join(&before[2]), cfg.dir.join(&before[0])).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        has(&r, Kind::SegmentHashMismatch, &before[0], None),
        "{:#?}",
        r.problems
    );
    fs::remove_file(cfg.dir.join(&before[0])).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.segments, 1);
    assert_eq!(r.segments_removed, 2);
    assert_eq!(r.removed_by_retention.len(), 2);
    assert_eq!(r.removed_by_retention[0].path, before[0]);
    assert_eq!(r.removed_by_retention[0].at, now);
    assert_eq!(r.removed_by_retention[0].retention_days, 7);

    // Running it again removes nothing more and adds no entry.
    let lines = manifest::Manifest::read(&cfg.dir).unwrap().0.lines.len();
    apply_retention(&cfg, 7, now).unwrap();
    assert_eq!(
        manifest::Manifest::read(&cfg.dir).unwrap().0.lines.len(),
        lines
    );

    // The chain goes on after retention.
    let log = AuditLog::open(&cfg).await.unwrap();
    assert_eq!(log.append(sample(0, now)).await.unwrap(), 31);
    log.shutdown().await;
    assert!(verify(&cfg.dir, &key(&cfg)).ok);
}

#[tokio::test]
async fn failed_wal_write_refuses_then_recovers_without_loss() {
    failed_wal_write_refuses_then_recovers(DurabilityMode::ReadParallel).await;
}

// In `buffered` durability the session writes its record itself: the
// same refusal and recovery on the caller's side of the store.
#[tokio::test]
async fn failed_inline_wal_write_refuses_then_recovers_without_loss() {
    failed_wal_write_refuses_then_recovers(DurabilityMode::Buffered).await;
}

async fn failed_wal_write_refuses_then_recovers(durability: DurabilityMode) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.durability = durability;
    let (log, now) = open_with_samples(&cfg, 5).await;
    // A full disk in the middle of a frame.
    store::faults::fail_next_write(&cfg.dir.join("wal"), 37);
    let err = log.append(sample(5, now)).await.unwrap_err();
    assert!(matches!(err, AuditError::Wal(_)), "{err}");
    // Space is back: the chain continues without a gap.
    assert_eq!(log.append(sample(6, now)).await.unwrap(), 6);

    // A crash now: recovery reads the retired file and its successor.
    let crashed = tmp.path().join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 6);

    let cfg2 = AuditConfig {
        dir: crashed,
        ..cfg.clone()
    };
    let log = AuditLog::open(&cfg2).await.unwrap();
    assert_eq!(log.append(sample(7, now)).await.unwrap(), 7);
    log.shutdown().await;
    let r = verify(&cfg2.dir, &key(&cfg2));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 7);
}

// A batch whose sync failed is refused, yet it may be on the disk whole,
// its seal included (the sync reported failure for data that got there,
// and a crash undid the truncation). Replay must not take records whose
// callers were told they were refused, even when a crash comes before
// the next batch: the refused sequences belong to the next records.
#[tokio::test]
async fn a_refused_batch_left_whole_on_disk_is_not_replayed_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (log, now) = open_with_samples(&cfg, 4).await;
    store::faults::fail_next_sync_after_whole_write(&cfg.dir.join("wal"));
    let err = log.append(sample(5, now)).await.unwrap_err();
    assert!(matches!(err, AuditError::Wal(_)), "{err}");
    // A crash now, before any other batch.
    let crashed = tmp.path().join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    let cfg2 = AuditConfig {
        dir: crashed,
        ..cfg.clone()
    };
    let log = AuditLog::open(&cfg2).await.unwrap();
    assert_eq!(
        log.append(sample(6, now)).await.unwrap(),
        5,
        "the refused record's sequence goes to the next record"
    );
    log.shutdown().await;
    let r = verify(&cfg2.dir, &key(&cfg2));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 5);
}

// In `buffered` durability a retired WAL file is synced by the writer
// when it leaves it; if that sync fails, the next record is refused, as
// after a failed background sync, and the one after it is taken again.
// A failed write is what retires the file here: it always does, where a
// segment cut retires only a plain file (not a preallocated spare).
#[tokio::test]
async fn failed_sync_of_a_retired_wal_file_refuses_the_next_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.durability = DurabilityMode::Buffered;
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    assert_eq!(log.append(sample(1, now)).await.unwrap(), 1);
    store::faults::fail_next_write(&cfg.dir.join("wal"), 0);
    store::faults::fail_next_catch_up_sync(&cfg.dir.join("wal"));
    let err = log.append(sample(2, now)).await.unwrap_err();
    assert!(matches!(err, AuditError::Wal(_)), "{err}");
    let err = log.append(sample(3, now)).await.unwrap_err();
    assert!(err.to_string().contains("earlier WAL sync failed"), "{err}");
    assert_eq!(log.append(sample(4, now)).await.unwrap(), 2);
    log.shutdown().await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 2);
}

// A preallocated WAL file is written across segment cuts, so in
// `buffered` durability the writer syncs it before it hands a segment's
// records over: their manifest entry must not get ahead of their WAL
// copy. If that sync fails, the next record is refused, as after a failed
// background sync, and nothing acknowledged is lost.
#[tokio::test]
async fn a_segment_cut_syncs_the_preallocated_wal_file_and_a_failure_refuses_the_next_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.durability = DurabilityMode::Buffered;
    // Segments are cut on age only.
    cfg.segment_max_age_secs = 1;
    cfg.segment_max_records = 1_000_000;
    let wal_dir = cfg.dir.join("wal");
    let in_preallocated_file = || {
        fs::read_dir(&wal_dir).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("wal-v2-")
                && e.metadata().unwrap().len() == super::wal::PREALLOC_BYTES
        })
    };
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    let mut acknowledged = 0u64;
    // The first file is a plain one, retired at every cut; the writer
    // moves to a preallocated one once the current file holds a MiB and
    // the preparer has a spare ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !in_preallocated_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never moved to a preallocated WAL file (spares are made only \
             while the file system has {} bytes free)",
            super::wal::PREALLOC_MIN_FREE
        );
        log.append(sample(acknowledged as usize, now))
            .await
            .unwrap();
        acknowledged += 1;
    }
    // The next cut (on age, within about a second) syncs the current file,
    // which it does not retire; that sync fails.
    store::faults::fail_next_catch_up_sync(&wal_dir);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no record was refused after the failed sync at a cut"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match log.append(sample(acknowledged as usize, now)).await {
            Ok(seq) => {
                acknowledged += 1;
                assert_eq!(seq, acknowledged);
            }
            Err(err) => break err,
        }
    };
    assert!(
        refused.to_string().contains("earlier WAL sync failed"),
        "{refused}"
    );
    assert_eq!(
        log.append(sample(0, now)).await.unwrap(),
        acknowledged + 1,
        "records are taken again after the refusal"
    );
    acknowledged += 1;
    log.shutdown().await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, acknowledged);
}

#[tokio::test]
async fn files_and_directories_get_audit_modes() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.dir), 0o750);
    assert_eq!(mode(&cfg.dir.join("records")), 0o750);
    assert_eq!(mode(&cfg.dir.join("checkpoints")), 0o750);
    assert_eq!(mode(&cfg.dir.join(manifest::FILE)), 0o640);
    for s in segments(&cfg) {
        assert_eq!(mode(&cfg.dir.join(&s)), 0o640, "{s}");
        assert_eq!(mode(cfg.dir.join(&s).parent().unwrap()), 0o750, "{s}");
    }
    for (_, p) in checkpoint::list(&cfg.dir.join("checkpoints")).unwrap() {
        assert_eq!(mode(&p), 0o640);
    }
    assert_eq!(mode(&cfg.dir.join("keys/checkpoint.key")), 0o600);
}

#[tokio::test]
async fn unknown_auditor_group_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.auditor_group = Some("no-such-group-tollgate".into());
    let err = AuditLog::open(&cfg).await.err().unwrap();
    assert!(err.to_string().contains("no-such-group-tollgate"), "{err}");
}

#[test]
fn keygen_writes_private_and_public_key() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("audit.key");
    keygen(&out, "tollgate/test").unwrap();
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let signer = checkpoint::Signer::load(&out).unwrap();
    let public = Verifier::load(&tmp.path().join("audit.key.pub")).unwrap();
    assert_eq!(public.key, signer.public().key);
    assert_eq!(public.name, "tollgate/test");
    // Never overwrite a key.
    assert!(keygen(&out, "tollgate/test").is_err());
}

// Checkpoints are numbered on from the highest file name: a planted one
// with the largest number stops the start with a clear error, rather than
// wrap the counter and write new checkpoints over the oldest signed ones.
#[tokio::test]
async fn a_checkpoint_numbered_with_the_largest_counter_stops_the_start_and_overwrites_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let checkpoints = cfg.dir.join("checkpoints");
    let before: Vec<(u64, Vec<u8>)> = checkpoint::list(&checkpoints)
        .unwrap()
        .into_iter()
        .map(|(n, path)| (n, fs::read(path).unwrap()))
        .collect();
    assert!(!before.is_empty());
    fs::write(
        checkpoints.join(checkpoint::file_name(u64::MAX)),
        "planted\n",
    )
    .unwrap();
    let err = AuditLog::open(&cfg).await.err().expect("the start stops");
    assert!(
        format!("{err:#}").contains("checkpoint counter exhausted"),
        "{err:#}"
    );
    for (n, bytes) in before {
        assert_eq!(
            fs::read(checkpoints.join(checkpoint::file_name(n))).unwrap(),
            bytes,
            "checkpoint {n}"
        );
    }
}

// A day's directory left by an attempt that failed after making it (its
// mode not yet set) is settled by the next segment written into it, so
// auditors can read that day's records.
#[tokio::test]
async fn a_day_directory_left_unsettled_gets_the_directory_mode() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let now = store::now_ms();
    let day_dir = cfg
        .dir
        .join("records")
        .join(format!("date={}", super::segment::day_of(now)));
    fs::create_dir_all(&day_dir).unwrap();
    fs::set_permissions(&day_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let log = AuditLog::open(&cfg).await.unwrap();
    assert_eq!(log.append(sample(1, now)).await.unwrap(), 1);
    log.shutdown().await;
    assert_eq!(
        fs::metadata(&day_dir).unwrap().permissions().mode() & 0o777,
        super::fsutil::DIR_MODE
    );
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
}

// A directory's two streams are signed with one key: the evidence
// stream's origin ends in `/evidence`, so its manifest, checkpoints and
// segments put in place of the audit stream's (every audit record gone,
// every signature valid) do not verify, nor the other way round.
#[tokio::test]
async fn one_stream_put_in_place_of_the_other_does_not_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let mut evidence = crate::evidence::evidence_config(&cfg);
    evidence.segment_max_records = 10;
    let log = AuditLog::open(&evidence).await.unwrap();
    let now = store::now_ms();
    for i in 0..15 {
        log.append(sample(i, now + i as i64)).await.unwrap();
    }
    log.shutdown().await;
    let k = key(&cfg);
    let (audit_report, evidence_report) = (verify(&cfg.dir, &k), verify(&evidence.dir, &k));
    assert!(audit_report.ok, "{:#?}", audit_report.problems);
    assert!(evidence_report.ok, "{:#?}", evidence_report.problems);
    let audit_origin = audit_report.origin.clone().expect("an origin");
    assert_eq!(
        evidence_report.origin,
        Some(format!("{audit_origin}{EVIDENCE_ORIGIN_SUFFIX}"))
    );

    // Each stream's signed files in place of the other's.
    let swapped = tmp.path().join("swapped");
    crash_copy(&cfg.dir, &swapped);
    let swapped_evidence = swapped.join("evidence");
    for part in ["manifest.jsonl", "checkpoints", "records"] {
        let (audit_part, evidence_part) = (swapped.join(part), swapped_evidence.join(part));
        let aside = swapped.join(format!("{part}.aside"));
        fs::rename(&audit_part, &aside).unwrap();
        fs::rename(&evidence_part, &audit_part).unwrap();
        fs::rename(&aside, &evidence_part).unwrap();
    }
    for stream in [&swapped, &swapped_evidence] {
        let r = verify(stream, &k);
        assert!(!r.ok, "{}", stream.display());
        assert!(
            r.problems
                .iter()
                .any(|p| p.kind == Kind::OriginOfAnotherStream),
            "{}: {:#?}",
            stream.display(),
            r.problems
        );
    }
    // Nor does the daemon start on them: it would sign the other stream's
    // history under this one's origin, and verify would pass it.
    let audit_on_swapped = AuditConfig {
        dir: swapped.clone(),
        ..cfg.clone()
    };
    let evidence_on_swapped = crate::evidence::evidence_config(&audit_on_swapped);
    for (stream, holds) in [
        (&audit_on_swapped, "audit"),
        (&evidence_on_swapped, "evidence"),
    ] {
        let before = fs::read(stream.dir.join(manifest::FILE)).unwrap();
        let err = AuditLog::open(stream).await.err().expect("refused");
        assert!(
            err.to_string()
                .contains(&format!("this directory holds the {holds} stream")),
            "{err:#}"
        );
        assert_eq!(fs::read(stream.dir.join(manifest::FILE)).unwrap(), before);
    }
}

/// A newest checkpoint whose file names another counter than it signs
/// (one copied or renamed into place) stops the start, touching nothing:
/// the daemon would sign on from a history that is not this one's.
#[tokio::test]
async fn a_newest_checkpoint_under_another_counters_name_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let (counter, newest) = checkpoint::list(&cfg.dir.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap();
    let renamed = cfg
        .dir
        .join("checkpoints")
        .join(checkpoint::file_name(counter + 5));
    fs::rename(&newest, &renamed).unwrap();
    let before = fs::read(cfg.dir.join(manifest::FILE)).unwrap();
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains("not the one its name says"),
        "{err:#}"
    );
    assert_eq!(fs::read(cfg.dir.join(manifest::FILE)).unwrap(), before);
    assert!(renamed.exists(), "the renamed checkpoint was left as found");
}

// Whoever can write the directory and restart the daemon can cut the
// history back to an older checkpoint, delete what came after, and have
// the daemon sign the rest again: verify passes that on its own. A
// checkpoint kept elsewhere shows it; a history that grew past the kept
// checkpoint verifies against it.
#[tokio::test]
async fn a_history_cut_back_and_signed_again_fails_against_a_kept_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let (_, newest) = checkpoint::list(&cfg.dir.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap();
    let kept = super::verify::TrustedCheckpoint {
        file: "kept.note".into(),
        text: fs::read_to_string(&newest).unwrap(),
    };
    let against = |trusted: &super::verify::TrustedCheckpoint| super::verify::Options {
        trusted_checkpoint: Some(trusted.clone()),
        ..Default::default()
    };
    let r = super::verify::verify_with(&cfg.dir, &key(&cfg), &against(&kept));
    assert!(r.ok, "{:#?}", r.problems);

    // The history grows: it still extends the kept checkpoint.
    let log = AuditLog::open(&cfg).await.unwrap();
    let now = store::now_ms();
    for i in 45..50 {
        log.append(sample(i, now + i as i64)).await.unwrap();
    }
    log.shutdown().await;
    let r = super::verify::verify_with(&cfg.dir, &key(&cfg), &against(&kept));
    assert!(r.ok, "{:#?}", r.problems);

    // Cut back to three entries, everything after them deleted, and the
    // daemon started over it.
    delete_checkpoints_signing_more_than(&cfg, 3);
    let mpath = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&mpath).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[3..] {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        fs::remove_file(cfg.dir.join(entry["path"].as_str().unwrap())).unwrap();
    }
    let cut: String = lines[..3].iter().map(|l| format!("{l}\n")).collect();
    fs::write(&mpath, cut).unwrap();
    AuditLog::open(&cfg).await.unwrap().shutdown().await;
    let alone = verify(&cfg.dir, &key(&cfg));
    assert!(
        alone.ok,
        "the cut history verifies on its own: {:#?}",
        alone.problems
    );
    assert_eq!(alone.last_sequence, Some(30));

    let r = super::verify::verify_with(&cfg.dir, &key(&cfg), &against(&kept));
    assert!(!r.ok);
    assert!(
        r.problems.iter().any(|p| p.kind == Kind::RolledBack
            && p.file == "kept.note"
            && p.detail
                .contains("it signs 5 manifest entries and the manifest has 3")),
        "{:#?}",
        r.problems
    );
    // A kept checkpoint only counts with a valid signature.
    let forged = super::verify::TrustedCheckpoint {
        file: "forged.note".into(),
        text: kept.text.replacen("\n5\n", "\n3\n", 1),
    };
    let r = super::verify::verify_with(&cfg.dir, &key(&cfg), &against(&forged));
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == Kind::CheckpointBadSignature && p.file == "forged.note"),
        "{:#?}",
        r.problems
    );
}

// Cutting the manifest back to an older checkpoint's size and deleting the
// newer checkpoints leaves a history the remaining signatures vouch for.
// The daemon does not sign it: the segment files past the cut, whose
// records the WAL no longer holds, stop the start, and are left in place.
#[tokio::test]
async fn a_manifest_cut_back_to_an_older_checkpoint_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    delete_checkpoints_signing_more_than(&cfg, 3);
    let mpath = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&mpath).unwrap();
    let kept: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    fs::write(&mpath, kept).unwrap();
    let segments_before = segments(&cfg);
    assert_eq!(segments_before.len(), 5);
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(
        err.to_string()
            .contains("a segment of records 31-40 past the manifest's end")
            && err.to_string().contains("nothing was changed"),
        "{err:#}"
    );
    assert_eq!(segments(&cfg), segments_before);
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        r.problems.iter().any(|p| p.kind == Kind::SegmentUnlisted),
        "{:#?}",
        r.problems
    );
}

// A first start that generates the development key and is cut short
// leaves at most a public key whose private key never appeared (and a
// temporary file): the next start generates a key that loads, and starts.
#[tokio::test]
async fn a_start_cut_short_while_generating_its_key_does_not_stop_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.signing_key = None;
    let keys = cfg.dir.join("keys");
    fs::create_dir_all(&keys).unwrap();
    fs::write(keys.join("checkpoint.key.pub"), "a key that never was\n").unwrap();
    fs::write(keys.join("checkpoint.key.tmp"), "PRIVATE+KEY+half").unwrap();
    let log = AuditLog::open(&cfg).await.expect("the next start");
    let now = store::now_ms();
    assert_eq!(log.append(sample(1, now)).await.unwrap(), 1);
    log.shutdown().await;
    let signer = checkpoint::Signer::load(&keys.join("checkpoint.key")).unwrap();
    let public = Verifier::load(&keys.join("checkpoint.key.pub")).unwrap();
    assert_eq!(public.key, signer.public().key);
    assert!(!keys.join("checkpoint.key.tmp").exists());
    let r = verify(&cfg.dir, &public);
    assert!(r.ok, "{:#?}", r.problems);
}

#[tokio::test]
async fn stale_latest_checkpoint_fails_when_an_age_limit_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let now = store::now_ms();
    let fresh = super::verify::Options {
        max_checkpoint_age_ms: Some(60_000),
        now_ms: now,
        trusted_checkpoint: None,
    };
    assert!(super::verify::verify_with(&cfg.dir, &key(&cfg), &fresh).ok);
    // The same directory examined an hour later: the daemon would have
    // signed newer checkpoints, so the tail must have been cut.
    let later = super::verify::Options {
        max_checkpoint_age_ms: Some(60_000),
        now_ms: now + 3_600_000,
        trusted_checkpoint: None,
    };
    let r = super::verify::verify_with(&cfg.dir, &key(&cfg), &later);
    assert!(!r.ok);
    assert_eq!(r.problems[0].kind, Kind::CheckpointStale);
}

#[tokio::test]
async fn verify_command_exits_by_verdict_and_writes_the_report() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        audit: AuditCommand,
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let report = tmp.path().join("report.json");
    let args = |dir: &Path| {
        Cli::try_parse_from([
            "audit".as_ref(),
            "verify".as_ref(),
            dir.as_os_str(),
            "--public-key".as_ref(),
            cfg.dir.join("keys/checkpoint.key.pub").as_os_str(),
            "--report".as_ref(),
            report.as_os_str(),
        ])
        .unwrap()
        .audit
    };
    let code = run_command(args(&cfg.dir)).unwrap();
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["records"], 45);

    // Against a kept checkpoint: the directory's own newest one passes;
    // one this directory never signed (another key's) fails; a file that
    // is not there is an error, not a verdict.
    let kept = checkpoint::list(&cfg.dir.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let other = tempfile::tempdir().unwrap();
    let foreign = build(other.path()).await;
    let foreign_note = checkpoint::list(&foreign.dir.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let with_trusted = |note: &Path| {
        Cli::try_parse_from([
            "audit".as_ref(),
            "verify".as_ref(),
            cfg.dir.as_os_str(),
            "--public-key".as_ref(),
            cfg.dir.join("keys/checkpoint.key.pub").as_os_str(),
            "--trusted-checkpoint".as_ref(),
            note.as_os_str(),
        ])
        .unwrap()
        .audit
    };
    assert_eq!(
        run_command(with_trusted(&kept)).unwrap(),
        std::process::ExitCode::SUCCESS
    );
    assert_eq!(
        run_command(with_trusted(&foreign_note)).unwrap(),
        std::process::ExitCode::FAILURE
    );
    let missing =
        run_command(with_trusted(&tmp.path().join("missing.note"))).expect_err("an error");
    assert!(
        missing.to_string().contains("--trusted-checkpoint"),
        "{missing:#}"
    );

    fs::remove_file(cfg.dir.join(&segments(&cfg)[0])).unwrap();
    let code = run_command(args(&cfg.dir)).unwrap();
    assert_eq!(code, std::process::ExitCode::FAILURE);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["problems"][0]["kind"], "segment_missing");
}

#[tokio::test]
async fn deleted_row_is_reported_as_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[1].clone();
    let path = cfg.dir.join(&victim);
    let mut gone = None;
    rewrite_segment(&path, |rows| gone = Some(rows.remove(4)));
    let gone = gone.unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let gap = r
        .problems
        .iter()
        .find(|p| p.kind == Kind::SequenceGap)
        .unwrap();
    assert_eq!(gap.file, victim);
    assert_eq!(gap.sequence, Some(gone.sequence + 1));
    assert!(has(&r, Kind::MerkleRootMismatch, &victim, None));
}

#[tokio::test]
async fn rechained_forgery_is_caught_by_the_signed_roots() {
    // An attacker without the key alters a row and recomputes every hash
    // after it in the file, so the rows chain perfectly among themselves.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[1].clone();
    let path = cfg.dir.join(&victim);
    rewrite_segment(&path, |rows| {
        rows.sort_by_key(|r| r.sequence);
        rows[2].query_info_query_string = "SELECT 1".into();
        let mut prev = rows[0].prev_record_hash.clone();
        for r in rows.iter_mut() {
            r.prev_record_hash = prev;
            r.record_hash = r.compute_hash();
            prev = r.record_hash.clone();
        }
    });
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert!(!r
        .problems
        .iter()
        .any(|p| p.kind == Kind::RecordHashMismatch));
    assert!(has(&r, Kind::MerkleRootMismatch, &victim, None));
    assert!(has(&r, Kind::ManifestMismatch, &victim, None));
    assert!(has(&r, Kind::SegmentHashMismatch, &victim, None));
}

/// Every single flipped byte of a segment is reported against that file,
/// and verify itself survives whatever the Parquet decoder makes of the
/// damaged bytes (a decoder panic on a crafted file would otherwise end
/// the run with no report at all).
#[tokio::test]
async fn any_flipped_byte_in_a_segment_is_reported_and_verify_survives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let victim = segments(&cfg)[1].clone();
    let path = cfg.dir.join(&victim);
    let original = fs::read(&path).unwrap();
    let key = key(&cfg);
    // xorshift64: reproducible positions spread over the whole file,
    // footer and page headers included.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // The footer (Thrift metadata: column offsets, sizes, statistics) is
    // where a flip most often sends the decoder astray: most flips go there.
    let footer = footer(&original);
    let (footer_start, footer_len) = (footer.start, footer.len());
    let mut positions: Vec<usize> = (0..16)
        .map(|_| (next() % original.len() as u64) as usize)
        .collect();
    positions.extend((0..48).map(|_| footer_start + (next() % footer_len as u64) as usize));
    // The footer's length and magic, every byte.
    positions.extend(original.len() - 8..original.len());
    for at in positions {
        let mut damaged = original.clone();
        damaged[at] ^= 1 << (next() % 8);
        fs::write(&path, &damaged).unwrap();
        let r = verify(&cfg.dir, &key);
        assert!(
            has(&r, Kind::SegmentHashMismatch, &victim, None),
            "byte {at} of {} flipped: {:#?}",
            original.len(),
            r.problems
        );
    }
    fs::write(&path, &original).unwrap();
    assert!(verify(&cfg.dir, &key).ok);
}

/// Where a Parquet file's footer metadata lies: before its 4-byte length
/// and the closing magic.
fn footer(file: &[u8]) -> std::ops::Range<usize> {
    let end = file.len() - 8;
    let len = u32::from_le_bytes(file[end..end + 4].try_into().unwrap()) as usize;
    end - len..end
}

/// The bytes of the Parquet file `original` with its footer metadata
/// changed by `alter` and encoded again: a crafted file, not a random one.
fn with_altered_footer(
    original: &[u8],
    alter: impl FnOnce(
        parquet::file::metadata::ColumnChunkMetaData,
    ) -> parquet::file::metadata::ColumnChunkMetaData,
) -> Vec<u8> {
    use parquet::file::metadata::{ParquetMetaDataReader, ParquetMetaDataWriter};
    let footer = footer(original);
    let start = footer.start;
    let metadata = ParquetMetaDataReader::decode_metadata(&original[footer]).unwrap();
    let mut builder = metadata.into_builder();
    let mut groups = builder.take_row_groups();
    let first = groups.remove(0);
    let mut columns = first.columns().to_vec();
    columns[0] = alter(columns[0].clone());
    groups.insert(
        0,
        first
            .into_builder()
            .set_column_metadata(columns)
            .build()
            .unwrap(),
    );
    let metadata = builder.set_row_groups(groups).build();
    let mut bytes = original[..start].to_vec();
    ParquetMetaDataWriter::new(&mut bytes, &metadata)
        .finish()
        .unwrap();
    bytes
}

/// A segment whose footer claims a negative column offset makes the
/// Parquet decoder panic (a documented assertion of the parquet crate):
/// verify reports the file and goes on to the rest of the directory.
#[tokio::test]
async fn a_segment_that_crashes_the_parquet_decoder_is_reported_and_verify_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let files = segments(&cfg);
    let victim = files[1].clone();
    let path = cfg.dir.join(&victim);
    let crafted = with_altered_footer(&fs::read(&path).unwrap(), |column| {
        column
            .into_builder()
            .set_dictionary_page_offset(None)
            .set_data_page_offset(-1)
            .build()
            .unwrap()
    });
    fs::write(&path, crafted).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    let unreadable = r
        .problems
        .iter()
        .find(|p| p.kind == Kind::SegmentUnreadable && p.file == victim)
        .unwrap_or_else(|| panic!("{:#?}", r.problems));
    assert!(
        unreadable.detail.contains("decoder"),
        "{}",
        unreadable.detail
    );
    assert!(has(&r, Kind::SegmentHashMismatch, &victim, None));
    // The segments after it were still read: all their records counted.
    assert_eq!(r.records, 35, "{:#?}", r.problems);
    assert_eq!(r.segments, 5);
}

/// Appends `entry` to the manifest of the stopped store at `cfg`, as
/// anyone who can write the directory (but has not the key) can.
fn append_entry(cfg: &AuditConfig, entry: manifest::Entry) {
    let (m, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    m.into_appender()
        .append(&cfg.dir, &super::fsutil::Perms::default(), &entry)
        .unwrap();
}

/// The manifest lines in the file(s) a start set aside, and the notes
/// verify gives for them.
fn set_aside_lines(cfg: &AuditConfig) -> Vec<String> {
    let mut lines = Vec::new();
    for e in fs::read_dir(&cfg.dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("manifest.unsigned-") {
            let text = fs::read_to_string(cfg.dir.join(name)).unwrap();
            lines.extend(text.lines().map(str::to_owned));
        }
    }
    lines
}

/// The daemon signs every manifest line at its next checkpoint: a line
/// someone appended while it was stopped would become as good as its own.
/// A retention entry dated ahead, with a period of 0 days, would have the
/// daemon delete every segment and sign the deletion. It is set aside
/// instead, as evidence: nothing is deleted, and the directory verifies.
#[tokio::test]
async fn a_forged_retention_entry_is_set_aside_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = build(tmp.path()).await;
    cfg.retention_days = Some(30);
    let before = segments(&cfg);
    let (m, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    let signed = m.lines.len();
    let removed: Vec<manifest::RemovedSegment> = m
        .entries
        .iter()
        .enumerate()
        .filter_map(|(line, e)| match e {
            manifest::Entry::Segment(s) => Some(manifest::RemovedSegment {
                line: line as u64,
                path: s.path.clone(),
                first_seq: s.first_seq,
                last_seq: s.last_seq,
                last_time: s.last_time,
            }),
            manifest::Entry::Retention(_) => None,
        })
        .collect();
    append_entry(
        &cfg,
        manifest::Entry::Retention(manifest::RetentionEntry {
            at: store::now_ms() + 86_400_000,
            retention_days: 0,
            removed,
        }),
    );
    let log = AuditLog::open(&cfg).await.expect("starts");
    assert_eq!(log.append(sample(0, store::now_ms())).await.unwrap(), 46);
    log.shutdown().await;
    assert_eq!(
        segments(&cfg)[..before.len()],
        before[..],
        "nothing was deleted"
    );
    let aside = set_aside_lines(&cfg);
    assert_eq!(aside.len(), 1);
    assert!(aside[0].contains("\"retention\""), "{aside:?}");
    let (m, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    assert!(m.lines.len() > signed);
    assert!(m
        .entries
        .iter()
        .all(|e| matches!(e, manifest::Entry::Segment(_))));
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert!(has_note(&r, "set aside at a start"), "{:?}", r.notes);
    // A retention pass run by hand sets such a line aside as well.
    append_entry(
        &cfg,
        manifest::Entry::Retention(manifest::RetentionEntry {
            at: store::now_ms(),
            retention_days: 0,
            removed: Vec::new(),
        }),
    );
    apply_retention(&cfg, 30, store::now_ms()).unwrap();
    assert_eq!(set_aside_lines(&cfg).len(), 2);
    assert!(verify(&cfg.dir, &key(&cfg)).ok);
}

/// A segment entry appended by hand, whose records the WAL does not hold,
/// stops the start, wherever its file is, and nothing is changed: setting
/// it aside would give its sequence numbers to the next records.
#[tokio::test]
async fn a_forged_segment_entry_stops_the_start_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let (m, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    let Some(last) = m.last_segment().cloned() else {
        panic!("a segment");
    };
    let span = last.last_seq - last.first_seq + 1;
    let own_place = segment::relative_path(
        &segment::day_of(last.first_time),
        last.last_seq + 1,
        last.last_seq + span,
    );
    fs::copy(cfg.dir.join(&last.path), cfg.dir.join(&own_place)).unwrap();
    append_entry(
        &cfg,
        manifest::Entry::Segment(manifest::SegmentEntry {
            path: own_place.clone(),
            first_seq: last.last_seq + 1,
            last_seq: last.last_seq + span,
            first_prev_hash: last.last_record_hash.clone(),
            ..last.clone()
        }),
    );
    let manifest_before = fs::read(cfg.dir.join(manifest::FILE)).unwrap();
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains(&format!(
            "lists a segment of records {}-{}",
            last.last_seq + 1,
            last.last_seq + span
        )),
        "{err:#}"
    );
    assert_eq!(
        fs::read(cfg.dir.join(manifest::FILE)).unwrap(),
        manifest_before
    );
    assert!(cfg.dir.join(&own_place).exists(), "left in place");
    assert!(set_aside_lines(&cfg).is_empty());
    // A retention pass run by hand refuses it too.
    let err = apply_retention(&cfg, 30, store::now_ms()).expect_err("refused");
    assert!(err.to_string().contains("nothing was changed"), "{err:#}");
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        has(&r, Kind::ManifestUnsignedTail, manifest::FILE, None),
        "{:#?}",
        r.problems
    );
}

/// An unsigned entry whose records the WAL holds (what a crash between
/// an entry and its checkpoint leaves) is set aside with its file when the
/// file is where the daemon would have written that segment. A file the
/// line names anywhere else is left in place (the line is someone's word,
/// its path included), and verify reports it, since queries would read it.
#[tokio::test]
async fn an_unsigned_entry_naming_a_file_elsewhere_leaves_the_file_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crash_left_an_entry_unsigned(tmp.path()).await;
    // The unsigned line now names a copy of its file, elsewhere.
    let path = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&path).unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    let own_place = entry["path"].as_str().unwrap().to_owned();
    // Not named as a segment past the manifest's end, which a start
    // removes as a leftover to rebuild from the WAL.
    let (folder, _) = own_place.rsplit_once('/').unwrap();
    let elsewhere = format!("{folder}/copy.parquet");
    fs::copy(cfg.dir.join(&own_place), cfg.dir.join(&elsewhere)).unwrap();
    fs::remove_file(cfg.dir.join(&own_place)).unwrap();
    entry["path"] = serde_json::json!(elsewhere);
    fs::write(&path, format!("{entry}\n")).unwrap();

    let log = AuditLog::open(&cfg).await.expect("starts");
    assert_eq!(log.append(sample(9, store::now_ms())).await.unwrap(), 6);
    log.shutdown().await;
    assert_eq!(set_aside_lines(&cfg).len(), 1);
    assert!(cfg.dir.join(&elsewhere).exists(), "left in place");
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        has(&r, Kind::SegmentUnlisted, &elsewhere, None),
        "{:#?}",
        r.problems
    );
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    assert_eq!(r.records, 6);
}

/// A signed line changed (here: a segment's close time) no longer hashes
/// to the root the newest checkpoint signs: refused, rather than signed
/// over.
#[tokio::test]
async fn a_changed_signed_manifest_line_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let path = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut entry: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    entry["closed_at"] = serde_json::json!(entry["closed_at"].as_i64().unwrap() + 1);
    lines[1] = entry.to_string();
    fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(err.to_string().contains("no longer hash"), "{err:#}");
}

/// A directory (under `tmp`) as a crash between a segment's manifest
/// entry and its checkpoint leaves it: five records, in the WAL and in a
/// segment whose entry no checkpoint signs.
async fn crash_left_an_entry_unsigned(tmp: &Path) -> AuditConfig {
    let mut cfg = config(tmp);
    cfg.segment_max_age_secs = 3600;
    let (log, _) = open_with_samples(&cfg, 5).await;
    let crashed = tmp.join("crashed");
    crash_copy(&cfg.dir, &crashed);
    log.shutdown().await;
    let cfg = AuditConfig {
        dir: crashed,
        ..cfg
    };
    store::segment_without_checkpoint(&cfg);
    cfg
}

/// What a crash between a segment's manifest entry and its checkpoint
/// leaves (an unsigned entry whose records are still in the WAL, under
/// the daemon's seals): the entry is set aside, its records are written
/// again from the WAL, the chain goes on, and the directory verifies.
#[tokio::test]
async fn an_entry_a_crash_left_unsigned_is_written_again_from_the_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = crash_left_an_entry_unsigned(tmp.path()).await;
    let (m, _) = manifest::Manifest::read(&cfg.dir).unwrap();
    assert_eq!(m.lines.len(), 1, "the entry was appended, unsigned");

    let log = AuditLog::open(&cfg).await.expect("starts");
    assert_eq!(log.append(sample(9, store::now_ms())).await.unwrap(), 6);
    log.shutdown().await;
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(r.ok, "{:#?}", r.problems);
    assert_eq!(r.records, 6);
}

/// Lines a checkpoint signs that are gone from the manifest, or a signing
/// key that verifies no checkpoint: the daemon does not start (it would
/// sign over the loss, or over a manifest it cannot vouch for).
#[tokio::test]
async fn removed_signed_lines_or_a_changed_key_stop_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let path = cfg.dir.join(manifest::FILE);
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(err.to_string().contains("lines were removed"), "{err:#}");
    fs::write(&path, text).unwrap();

    for key in ["keys/checkpoint.key", "keys/checkpoint.key.pub"] {
        fs::remove_file(cfg.dir.join(key)).unwrap();
    }
    let err = AuditLog::open(&cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains("no checkpoint verifies"),
        "{err:#}"
    );
}

/// Runs `f` on a thread of its own: a test whose subject would block
/// forever fails after a minute instead of hanging.
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} did not finish within a minute"))
}

/// Opens the store at `cfg` (and shuts it down), within a minute: not
/// blocking, nor reading without end. Why it refused, if it did.
fn start_within_a_minute(cfg: &AuditConfig) -> Option<String> {
    let start = cfg.clone();
    within_a_minute("a start", move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            match AuditLog::open(&start).await {
                Ok(log) => {
                    log.shutdown().await;
                    None
                }
                Err(e) => Some(format!("{e:#}")),
            }
        })
    })
}

/// Why a start of the store at `cfg` is refused; it must be, within a
/// minute.
fn start_refused_within_a_minute(cfg: &AuditConfig) -> String {
    start_within_a_minute(cfg).expect("refused")
}

/// A file that is not a regular one where the store reads its own (a FIFO
/// among the checkpoints, a device behind a symlink among the WAL files)
/// is reported by verify, and stops a start with the reason, rather than
/// blocking either or being read without end.
#[tokio::test]
async fn files_that_are_not_regular_are_reported_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let checkpoints = cfg.dir.join("checkpoints");
    let (newest, _) = checkpoint::list(&checkpoints).unwrap().pop().unwrap();
    let fifo_name = checkpoint::file_name(newest + 1);
    let fifo = std::ffi::CString::new(
        checkpoints
            .join(&fifo_name)
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let wal_name = wal::file_name(99, 1_000_000);
    std::os::unix::fs::symlink("/dev/zero", cfg.dir.join("wal").join(&wal_name)).unwrap();

    let (dir, public) = (cfg.dir.clone(), key(&cfg));
    let r = within_a_minute("verify", move || verify(&dir, &public));
    assert!(
        has(
            &r,
            Kind::CheckpointMalformed,
            &format!("checkpoints/{fifo_name}"),
            None
        ),
        "{:#?}",
        r.problems
    );
    assert!(
        has(&r, Kind::WalUnreadable, &format!("wal/{wal_name}"), None),
        "{:#?}",
        r.problems
    );
    let err = start_refused_within_a_minute(&cfg);
    assert!(err.contains("not a regular file"), "{err}");
}

/// A day directory moved away and replaced by a symlink to it: every
/// listed segment still hashes right through the link, but DuckDB's
/// `records/**/*.parquet` does not follow it, so the day is missing from
/// every query. verify reports the link and reads no segment through it.
#[tokio::test]
async fn a_symlinked_day_directory_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let files = segments(&cfg);
    let day_dir = cfg.dir.join(files[0].rsplit_once('/').unwrap().0);
    let day = day_dir
        .strip_prefix(&cfg.dir)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let moved = tmp.path().join("moved");
    fs::rename(&day_dir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &day_dir).unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(!r.ok);
    assert!(
        has(&r, Kind::RecordsSymlink, &day, None),
        "{:#?}",
        r.problems
    );
    for f in &files {
        assert!(
            has(&r, Kind::RecordsSymlink, f, None),
            "{f}: {:#?}",
            r.problems
        );
    }
    assert_eq!(r.records, 0, "no segment is read through the link");
}

/// Files made huge without costing disk (sparse: a listed segment, the
/// manifest, a WAL file) are reported, not read into memory or for hours,
/// and a start refuses the damaged manifest instead of dying.
#[tokio::test]
async fn huge_sparse_files_are_reported_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    const HUGE: u64 = 1 << 40;
    let files = segments(&cfg);
    fs::OpenOptions::new()
        .write(true)
        .open(cfg.dir.join(&files[1]))
        .unwrap()
        .set_len(HUGE)
        .unwrap();
    let wal_name = wal::file_name(99, 1_000_000);
    fs::File::create(cfg.dir.join("wal").join(&wal_name))
        .unwrap()
        .set_len(HUGE)
        .unwrap();
    let (dir, public) = (cfg.dir.clone(), key(&cfg));
    let r = within_a_minute("verify", move || verify(&dir, &public));
    let segment_problem = r
        .problems
        .iter()
        .find(|p| p.file == files[1])
        .unwrap_or_else(|| panic!("{:#?}", r.problems));
    assert_eq!(segment_problem.kind, Kind::SegmentHashMismatch);
    assert!(
        segment_problem.detail.contains("not read"),
        "{segment_problem:?}"
    );

    // The manifest: its lines, then a terabyte of nothing. A crash can
    // leave an append's blocks zero: zeros to the end are a torn append,
    // judged without reading the hole, and a start cuts them off.
    let manifest = cfg.dir.join(manifest::FILE);
    let len = fs::metadata(&manifest).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_len(len + HUGE)
        .unwrap();
    let (dir, public) = (cfg.dir.clone(), key(&cfg));
    let r = within_a_minute("verify", move || verify(&dir, &public));
    assert!(!r.ok);
    assert!(
        r.problems
            .iter()
            .any(|p| p.file == manifest::FILE && p.detail.contains("zeros to the end")),
        "{:#?}",
        r.problems
    );
    assert_eq!(
        start_within_a_minute(&cfg),
        None,
        "starts over a torn append"
    );
    assert_eq!(
        fs::metadata(&manifest).unwrap().len(),
        len,
        "the zeros cut off"
    );

    // A zero byte with data after it is damage: no start over it.
    let mut bytes = fs::read(&manifest).unwrap();
    let last_line = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    bytes[last_line + 3] = 0;
    fs::write(&manifest, &bytes).unwrap();
    let err = start_refused_within_a_minute(&cfg);
    assert!(
        err.contains("is damaged") && err.contains("a zero byte"),
        "{err}"
    );
}

/// A signed line is never a torn append (lines are synced before they
/// are signed): zeros from the middle of one to the end of the file stop
/// the start, which cuts nothing off (the file is the evidence).
#[tokio::test]
async fn zeros_over_a_signed_line_stop_the_start_and_cut_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let manifest = cfg.dir.join(manifest::FILE);
    let mut bytes = fs::read(&manifest).unwrap();
    let last_line = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    for b in &mut bytes[last_line + 10..] {
        *b = 0;
    }
    fs::write(&manifest, &bytes).unwrap();
    let err = start_refused_within_a_minute(&cfg);
    assert!(err.contains("lines were removed"), "{err}");
    assert_eq!(
        fs::read(&manifest).unwrap(),
        bytes,
        "the manifest was changed"
    );
}

/// File names are anyone's who can write the directory: control
/// characters in one (an escape sequence that would move the cursor up
/// and erase the FAILED line on a terminal) are shown escaped.
#[tokio::test]
async fn control_characters_in_file_names_are_escaped_in_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = build(tmp.path()).await;
    let name = format!("{}\x1b[1A\x1b[2K.unsealed", wal::file_name(99, 1_000_000));
    fs::write(cfg.dir.join("wal").join(&name), b"").unwrap();
    let r = verify(&cfg.dir, &key(&cfg));
    assert!(
        r.notes.iter().any(|n| n.contains('\x1b')),
        "the report keeps the name: {:#?}",
        r.notes
    );
    let shown = verify::summary(&r);
    assert!(!shown.contains('\x1b'), "{shown}");
    assert!(shown.contains("\\u{1b}[1A"), "{shown}");
}
