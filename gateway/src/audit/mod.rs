//! The tamper-evident record of every request.

pub mod record;

pub use record::AuditRecord;
use serde::Deserialize;

/// Audit store settings (`[audit]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub dir: std::path::PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
}

/// Handle to the audit store; cheap to clone, shared by all sessions.
#[derive(Clone)]
pub struct AuditLog {}

impl AuditLog {
    pub async fn open(_config: &AuditConfig) -> anyhow::Result<Self> {
        anyhow::bail!("audit is not built yet")
    }

    /// Appends a record; returns its sequence number once it is durable.
    pub async fn append(&self, _record: AuditRecord) -> Result<u64, AuditError> {
        Err(AuditError::Unavailable("audit is not built yet".into()))
    }

    /// Flushes and closes the open segment.
    pub async fn shutdown(&self) {}
}
