//! The evidence stream and `tollgate verify`, as the tests read them.

use std::{path::Path, process::Command};

use serde_json::Value;

use crate::{duckdb, tollgate_bin};

/// What one `tollgate verify` run said.
pub struct VerifyRun {
    pub code: i32,
    /// stdout and stderr: the human summary.
    pub summary: String,
    /// The JSON report (`Null` if none was written).
    pub report: Value,
}

/// Runs `tollgate verify` on `audit_dir` (checkpoints signed by the key
/// whose public half is `public_key`), writing the report under `scratch`:
/// the integrity of both streams and the reconciliation.
pub fn verify(audit_dir: &Path, public_key: &Path, scratch: &Path) -> VerifyRun {
    verify_with(audit_dir, public_key, scratch, &[])
}

/// [`verify`] with further arguments (`--max-checkpoint-age-secs N`, ...).
pub fn verify_with(
    audit_dir: &Path,
    public_key: &Path,
    scratch: &Path,
    args: &[&str],
) -> VerifyRun {
    let report_path = scratch.join("verify.json");
    let _ = std::fs::remove_file(&report_path);
    let out = Command::new(tollgate_bin())
        .arg("verify")
        .arg(audit_dir)
        .arg("--public-key")
        .arg(public_key)
        .arg("--report")
        .arg(&report_path)
        .args(args)
        .output()
        .expect("run tollgate verify");
    VerifyRun {
        code: out.status.code().unwrap_or(-1),
        summary: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        report: std::fs::read(&report_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null),
    }
}

/// Rows of the evidence stream of `audit_dir` matching `sql` over the view `audit`.
pub fn rows(audit_dir: &Path, sql: &str) -> Vec<Value> {
    duckdb::query(&audit_dir.join("evidence"), sql).expect("query the evidence stream")
}

/// Evidence rows of one kind (`tcp_connect`, `redirected`, `refused_datagram`, ...).
pub fn rows_of_kind(audit_dir: &Path, kind: &str, extra_where: &str) -> Vec<Value> {
    let extra = if extra_where.is_empty() {
        String::new()
    } else {
        format!(" AND {extra_where}")
    };
    rows(
        audit_dir,
        &format!(
            "SELECT *, json_extract_string(unmapped, '$.family') AS family FROM audit \
             WHERE phase = 'evidence' AND json_extract_string(unmapped, '$.kind') = '{kind}'{extra} \
             ORDER BY sequence"
        ),
    )
}
