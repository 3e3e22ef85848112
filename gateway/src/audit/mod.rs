//! The tamper-evident record of every request.
//!
//! Path of a record: [`AuditLog::append`] -> WAL (group-committed fdatasync,
//! hash-chained) -> Parquet segment (zstd, hive-partitioned by day) ->
//! manifest entry (file SHA-256, RFC 6962 root) -> signed checkpoint.
//! docs/audit-schema.md, docs/verification.md and docs/queries.md describe
//! the files for the people who read them.

mod checkpoint;
mod fsutil;
mod manifest;
mod merkle;
pub mod record;
mod segment;
pub(crate) use segment::decoding;
mod store;
#[cfg(test)]
mod tamper_tests;
#[cfg(test)]
pub(crate) mod tests;
pub mod verify;
mod wal;

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::mpsc,
    task::{Context, Poll},
};

pub use record::*;
use serde::Deserialize;
use tokio::sync::oneshot;

pub use store::apply_retention;
pub use wal::frame_len as wal_frame_len;

/// The records of the WAL of the stream in `dir` (`dir/wal`) that a seal
/// covers, as a restart would take them: a batch whose write failed is
/// superseded by its retry; a frame cut short by a crash, and records past
/// the last seal (never acknowledged, or not written by tollgate) are left
/// out. The seals' keyed MACs are not checked (that needs the daemon's
/// key), nor the chain (verify's integrity pass does). Empty when the
/// stream has no WAL.
pub fn wal_records(dir: &std::path::Path) -> std::io::Result<Vec<AuditRecord>> {
    let mut merged = wal::read_all(&dir.join("wal"))?;
    let last_sealed = merged.seals.keys().max().copied().unwrap_or(0);
    merged.records.retain(|r| r.sequence <= last_sealed);
    Ok(merged.records)
}

/// `tollgate audit ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify an audit directory offline: signatures, file hashes, Merkle
    /// roots, the record chain, checkpoints and the WAL. Exits non-zero on
    /// any problem.
    Verify {
        /// The audit directory (the `[audit] dir` of the daemon, or a copy).
        dir: PathBuf,
        /// The checkpoint signer's public key (`<key>.pub` from keygen).
        #[arg(long)]
        public_key: PathBuf,
        /// Also write the full report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Fail if the latest checkpoint is older than this many seconds
        /// (for a directory just collected from a running daemon: a stale
        /// latest checkpoint means the tail was cut).
        #[arg(long)]
        max_checkpoint_age_secs: Option<u64>,
        /// A checkpoint of this directory kept elsewhere (a copy of one of
        /// its `checkpoints/*.note`, shipped off the host or kept from an
        /// earlier verify): fail unless the directory's history extends
        /// the one it signs.
        #[arg(long)]
        trusted_checkpoint: Option<PathBuf>,
    },
}

/// Runs an audit subcommand; the exit code is the verdict.
pub fn run_command(cmd: AuditCommand) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        AuditCommand::Verify {
            dir,
            public_key,
            report,
            max_checkpoint_age_secs,
            trusted_checkpoint,
        } => {
            // Progress on large directories goes to stderr; the daemon's
            // own subscriber, when already installed, wins.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .try_init();
            let trusted_checkpoint = trusted_checkpoint
                .map(|path| {
                    checkpoint::read_note(&path)
                        .map(|text| verify::TrustedCheckpoint {
                            file: path.display().to_string(),
                            text,
                        })
                        .map_err(|e| {
                            anyhow::anyhow!("--trusted-checkpoint {}: {e}", path.display())
                        })
                })
                .transpose()?;
            let r = verify_and_summarise(
                &dir,
                &public_key,
                max_checkpoint_age_secs,
                trusted_checkpoint,
            )?;
            if let Some(out) = report {
                let json = serde_json::to_vec_pretty(&r)?;
                std::fs::write(&out, json)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            }
            Ok(if r.ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
    }
}

/// Verifies an audit directory (see [`verify::verify_dir`]) and prints
/// its summary to stdout, as `tollgate audit verify` does; the report is
/// returned to the caller, never read back from a file.
pub fn verify_and_summarise(
    dir: &std::path::Path,
    public_key: &std::path::Path,
    max_checkpoint_age_secs: Option<u64>,
    trusted_checkpoint: Option<verify::TrustedCheckpoint>,
) -> anyhow::Result<verify::Report> {
    let opts = verify::Options {
        max_checkpoint_age_ms: max_checkpoint_age_secs
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)),
        now_ms: store::now_ms(),
        trusted_checkpoint,
    };
    let r = verify::verify_dir(dir, public_key, &opts)?;
    print!("{}", verify::summary(&r));
    Ok(r)
}

/// What `tollgate check-config` checks of `[audit]` without touching the
/// directory: the auditor group exists and the signing key, when one is
/// configured, loads. Either failing would stop the daemon at start, after
/// it pinned the redirect: agents refused until someone looks.
pub fn check_config(cfg: &AuditConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    fsutil::Perms::for_group(cfg.auditor_group.as_deref())
        .with_context(|| format!("audit.auditor_group {:?}", cfg.auditor_group))?;
    if let Some(origin) = &cfg.origin {
        // The first line of every checkpoint note; the evidence stream's
        // is this followed by EVIDENCE_ORIGIN_SUFFIX, so the audit
        // stream's must not look like one.
        if origin.is_empty()
            || origin.chars().any(char::is_control)
            || origin.ends_with(EVIDENCE_ORIGIN_SUFFIX)
        {
            anyhow::bail!(
                "audit.origin {origin:?}: give a name of one line, not ending in \
                 {EVIDENCE_ORIGIN_SUFFIX:?} (the evidence stream's origin is this one followed \
                 by it)"
            );
        }
    }
    if let Some(path) = &cfg.signing_key {
        crate::config::refuse_world_access(path)
            .map_err(|reason| anyhow::anyhow!("audit.signing_key {reason}"))?;
        checkpoint::Signer::load(path)
            .with_context(|| format!("audit.signing_key {}", path.display()))?;
    }
    // Bounds that keep the store what it says it is: retention of 0 days
    // (read by some as "keep for ever") would delete every closed segment
    // at every pass, and verify would pass the empty trail; a checkpoint
    // interval of hours lets a truncated tail pass for a quiet period; a
    // background sync of seconds acknowledges records a host crash loses.
    if cfg.retention_days == Some(0) {
        anyhow::bail!(
            "audit.retention_days: 0 would delete every closed segment; give at least 1, or \
             leave it out to keep everything"
        );
    }
    let bounded = [
        (
            "checkpoint_interval_secs",
            cfg.checkpoint_interval_secs,
            1,
            3600,
        ),
        ("segment_max_age_secs", cfg.segment_max_age_secs, 1, 86_400),
        (
            "buffered_sync_interval_ms",
            cfg.buffered_sync_interval_ms,
            1,
            1000,
        ),
        (
            "segment_max_records",
            cfg.segment_max_records as u64,
            1,
            10_000_000,
        ),
    ];
    for (name, value, least, most) in bounded {
        if !(least..=most).contains(&value) {
            anyhow::bail!("audit.{name}: {value} is out of range; allowed: {least} to {most}");
        }
    }
    Ok(())
}

/// `tollgate keygen --out PATH [--name NAME]`: writes an Ed25519 checkpoint
/// signing key to PATH (mode 0600) and its public key to PATH.pub, in the
/// signed-note key encoding. Refuses to overwrite either file.
pub fn keygen(out: &std::path::Path, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('+') || name.contains(char::is_whitespace) {
        anyhow::bail!("key name {name:?} must be non-empty, without '+' or spaces");
    }
    let signer = checkpoint::Signer::generate(name);
    checkpoint::write_keypair(&fsutil::Perms::default(), &signer, out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    Ok(())
}

/// Audit store settings (`[audit]` in the config file). Only `dir` is
/// required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit directory (WAL, segments, manifest, checkpoints).
    pub dir: PathBuf,
    /// A segment is closed at the latest this many seconds after its first
    /// record.
    #[serde(default = "default_segment_max_age_secs")]
    pub segment_max_age_secs: u64,
    /// ... or once it holds this many records.
    #[serde(default = "default_segment_max_records")]
    pub segment_max_records: usize,
    /// Ed25519 private key (from `tollgate keygen`) that signs checkpoints.
    /// When unset, a key is generated under `{dir}/keys/` on first start,
    /// with a warning: fine for development, not for production, where the
    /// key should live outside the directory it vouches for.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Checkpoint origin line; defaults to the signing key's name.
    #[serde(default)]
    pub origin: Option<String>,
    /// A checkpoint is written at least this often, also while idle, so a
    /// truncated tail cannot pass for a quiet period.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// Segments whose newest record is older than this are deleted, and the
    /// deletion is recorded in the manifest. Unset: keep forever.
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Group that owns the audit files (read access for auditors).
    #[serde(default)]
    pub auditor_group: Option<String>,
    /// When a record must be durable relative to forwarding the request.
    #[serde(default)]
    pub durability: DurabilityMode,
    /// In `buffered` durability: the WAL is fdatasynced at most this often
    /// (and as soon as this allows once written to). A crash of the host
    /// can lose about this much of the newest records.
    #[serde(default = "default_buffered_sync_interval_ms")]
    pub buffered_sync_interval_ms: u64,
    /// Which of a directory's two streams this store keeps: the evidence
    /// stream's checkpoints carry `EVIDENCE_ORIGIN_SUFFIX` after the
    /// origin, so that one stream (signed with the same key) cannot pass
    /// for the other. Not configured: set by the daemon.
    #[serde(skip)]
    pub evidence_stream: bool,
}

/// What the evidence stream's checkpoint origin carries after the audit
/// stream's.
pub const EVIDENCE_ORIGIN_SUFFIX: &str = "/evidence";

fn default_segment_max_age_secs() -> u64 {
    5
}
fn default_segment_max_records() -> usize {
    100_000
}
fn default_checkpoint_interval_secs() -> u64 {
    60
}
fn default_buffered_sync_interval_ms() -> u64 {
    5
}

impl AuditConfig {
    /// A configuration with every default, for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> AuditConfig {
        AuditConfig {
            dir: dir.into(),
            segment_max_age_secs: default_segment_max_age_secs(),
            segment_max_records: default_segment_max_records(),
            signing_key: None,
            origin: None,
            checkpoint_interval_secs: default_checkpoint_interval_secs(),
            retention_days: None,
            auditor_group: None,
            durability: DurabilityMode::default(),
            buffered_sync_interval_ms: default_buffered_sync_interval_ms(),
            evidence_stream: false,
        }
    }
}

/// When a protocol adapter may forward a request relative to its record
/// becoming durable (notes/audit-store.md, "Durability costs latency").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityMode {
    /// Provably read-only statements are forwarded while their record
    /// syncs; the response is held until the record is durable. Everything
    /// else (and every refusal) is durable before it is forwarded.
    #[default]
    ReadParallel,
    /// Every record is durable before its request is forwarded.
    Strict,
    /// Every record is written to the WAL (handed to the kernel: it
    /// survives a crash or kill of tollgate) before its request is
    /// forwarded, by the session itself; a background thread fdatasyncs
    /// the WAL at most every `buffered_sync_interval_ms`, so a crash of the
    /// whole host can lose what the last sync had not yet covered (up to
    /// that interval plus two fdatasyncs: a record written just after a
    /// sync started waits for the next one). For disks whose sync latency is the
    /// bottleneck; like auditd's `flush = incremental_async` or
    /// PostgreSQL's `synchronous_commit = off`.
    Buffered,
}

impl DurabilityMode {
    /// May a request be forwarded before its record is durable (written,
    /// in `buffered`)? Only a provably read-only one, and not in `strict`
    /// mode. The response must still wait for [`Durable`].
    pub fn may_forward_before_durable(self, provably_read_only: bool) -> bool {
        self != DurabilityMode::Strict && provably_read_only
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
    /// The WAL could not be written (disk full, I/O error): the request
    /// must be refused. The store keeps working once the cause is gone.
    #[error("audit write failed: {0}")]
    Wal(String),
    /// The record's encoding is longer than the WAL can hold and read back
    /// (a statement of tens of MiB): it is not written, and the request it
    /// describes must be refused. Nothing else is affected.
    #[error("audit record too large: {bytes} bytes, the most a record may take is {limit}")]
    TooLarge { bytes: usize, limit: usize },
}

/// Handle to the audit store; cheap to clone, shared by all sessions.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<store::Msg>,
    /// `buffered` durability: records are written by the caller.
    inline: Option<store::InlineWriter>,
    mode: DurabilityMode,
}

/// A submitted record that is not yet known to be durable. Await it for
/// the sequence number; it resolves once the record is fsynced in the WAL.
/// Until then nothing that depends on the record (the response to the
/// agent, or a state-changing request) may go out.
#[must_use = "a record is only safe to act on once its Durable resolves"]
pub struct Durable {
    state: DurableState,
}

enum DurableState {
    /// The writer thread answers once the record is synced.
    Waiting(oneshot::Receiver<Result<u64, AuditError>>),
    /// Known when submitted (written inline, or refused at once); taken by
    /// the first poll that sees it.
    Known(Option<Result<u64, AuditError>>),
}

impl Durable {
    pub(crate) fn known(result: Result<u64, AuditError>) -> Self {
        Durable {
            state: DurableState::Known(Some(result)),
        }
    }

    /// A record the writer thread answers for through `rx`, for tests.
    #[cfg(test)]
    pub(crate) fn waiting(rx: oneshot::Receiver<Result<u64, AuditError>>) -> Self {
        Durable {
            state: DurableState::Waiting(rx),
        }
    }

    /// Why the record was not written, if that is known by now, without
    /// waiting (and without a task's polling budget, which could hide an
    /// answer already there). Takes the writer's answer: the `Durable` is
    /// spent afterwards.
    pub fn failed_by_now(&mut self) -> Option<AuditError> {
        match &mut self.state {
            DurableState::Known(_) => self.known_failure().cloned(),
            DurableState::Waiting(rx) => match rx.try_recv() {
                Ok(Err(err)) => Some(err),
                Ok(Ok(_)) | Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => {
                    Some(AuditError::Unavailable("audit writer stopped".into()))
                }
            },
        }
    }

    /// Why the record was not written, when that is known as soon as it is
    /// submitted (too large for the WAL; in `buffered` durability, a failed
    /// write): a caller can then refuse the request before anything of it
    /// goes out.
    pub fn known_failure(&self) -> Option<&AuditError> {
        match &self.state {
            DurableState::Known(Some(Err(err))) => Some(err),
            _ => None,
        }
    }
}

impl Future for Durable {
    type Output = Result<u64, AuditError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            DurableState::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(AuditError::Unavailable("audit writer stopped".into())))
            }),
            DurableState::Known(result) => {
                Poll::Ready(result.take().unwrap_or_else(|| {
                    Err(AuditError::Unavailable("polled after completion".into()))
                }))
            }
        }
    }
}

/// The audit directory's lock (`{dir}/.lock`), held from
/// [`AuditLog::lock`] until the store it is opened with stops.
pub struct AuditDirLock {
    file: std::fs::File,
    perms: fsutil::Perms,
}

impl AuditLog {
    /// Opens the store: removes unfinished files, rebuilds segments from
    /// WAL records not yet in a closed segment, continues the chain, and
    /// starts the background writer threads.
    pub async fn open(config: &AuditConfig) -> anyhow::Result<Self> {
        Self::open_locked(config, Self::lock(config)?).await
    }

    /// Takes the audit directory's lock alone, making its folders, so that
    /// a daemon can stop at a directory another process holds before it
    /// changes anything else (its pins): the store is then opened with
    /// [`AuditLog::open_locked`].
    pub fn lock(config: &AuditConfig) -> anyhow::Result<AuditDirLock> {
        store::lock_directory(config).map(|(file, perms)| AuditDirLock { file, perms })
    }

    /// [`AuditLog::open`] on a directory whose lock is already held.
    pub async fn open_locked(config: &AuditConfig, lock: AuditDirLock) -> anyhow::Result<Self> {
        let cfg = config.clone();
        let started =
            tokio::task::spawn_blocking(move || store::start(&cfg, lock.file, lock.perms))
                .await??;
        Ok(AuditLog {
            tx: started.tx,
            inline: started.inline,
            mode: config.durability,
        })
    }

    /// The configured durability mode, for adapters to decide when to
    /// forward.
    pub fn durability(&self) -> DurabilityMode {
        self.mode
    }

    /// Queues a record and returns at once; the returned [`Durable`]
    /// resolves to its sequence number once it is fsynced. Records are
    /// chained in the order `submit` is called. Use it to forward a
    /// provably read-only statement while its record syncs, holding the
    /// response until the `Durable` resolves.
    pub fn submit(&self, record: AuditRecord) -> Durable {
        self.enqueue(record, store::Msg::Append)
    }

    /// Queues a record that nothing waits on before acting (the outcome of
    /// a request already answered): it is made durable with the next sync,
    /// at most a few milliseconds later, instead of forcing a sync of its
    /// own. The returned [`Durable`] still tells whether that happened.
    pub fn submit_lazy(&self, record: AuditRecord) -> Durable {
        let durable = self.enqueue(record, store::Msg::AppendLazy);
        if let DurableState::Known(Some(Err(err))) = &durable.state {
            // Callers may drop the result unread: say it here.
            tracing::warn!(error = %err, "a record was not written");
        }
        durable
    }

    /// Writes `record` inline (`buffered`), or encodes it and hands it to
    /// the writer thread as `message`.
    fn enqueue(
        &self,
        record: AuditRecord,
        message: fn(store::Pending, oneshot::Sender<Result<u64, AuditError>>) -> store::Msg,
    ) -> Durable {
        if let Some(inline) = &self.inline {
            return Durable::known(inline.append(record));
        }
        let pending = match store::Pending::new(record) {
            Ok(pending) => pending,
            Err(err) => return Durable::known(Err(err)),
        };
        let (otx, orx) = oneshot::channel();
        match self.tx.send(message(pending, otx)) {
            Ok(()) => Durable {
                state: DurableState::Waiting(orx),
            },
            Err(_) => Durable::known(Err(AuditError::Unavailable(
                "audit log is shut down".into(),
            ))),
        }
    }

    /// Appends a record; returns its sequence number once it is durable
    /// (fsynced WAL, group commit across concurrent callers). Fills
    /// `sequence`, `prev_record_hash` and `record_hash`.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.submit(record).await
    }

    /// Closes the open segment (writing it, its manifest entry and a
    /// checkpoint) and stops the writers. Appends after this fail.
    pub async fn shutdown(&self) {
        let (otx, orx) = oneshot::channel();
        if self.tx.send(store::Msg::Shutdown(otx)).is_ok() {
            let _ = orx.await;
        }
    }
}
