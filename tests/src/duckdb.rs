//! Reads the audit Parquet the way an analyst does: DuckDB (the Python
//! package, as `cargo xtask setup` installs it) over the day-partitioned files.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The Python with duckdb installed (`TOLLGATE_PYTHON`, set by `cargo xtask test`).
pub fn python() -> String {
    std::env::var("TOLLGATE_PYTHON")
        .unwrap_or_else(|_| "/var/cache/tollgate/venv/bin/python".into())
}

const RUNNER: &str = r#"
import datetime, decimal, json, sys
import duckdb
audit_dir, sql = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute(f"CREATE VIEW audit AS SELECT * FROM read_parquet('{audit_dir}/records/**/*.parquet', hive_partitioning=true, union_by_name=true)")
cur = con.execute(sql)
cols = [d[0] for d in cur.description]
def plain(v):
    if isinstance(v, (datetime.date, datetime.datetime, decimal.Decimal)):
        return str(v)
    return v
print(json.dumps([{c: plain(v) for c, v in zip(cols, row)} for row in cur.fetchall()]))
"#;

/// Runs `sql` against a view `audit` over every Parquet file under
/// `audit_dir` and returns the rows as JSON objects.
pub fn query(audit_dir: &Path, sql: &str) -> Result<Vec<Value>> {
    let out = Command::new(python())
        .arg("-c")
        .arg(RUNNER)
        .arg(audit_dir)
        .arg(sql)
        .output()
        .context("run python with duckdb (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "duckdb query failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows: Value = serde_json::from_slice(&out.stdout)?;
    match rows {
        Value::Array(rows) => Ok(rows),
        other => bail!("unexpected duckdb output {other}"),
    }
}
