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

/// The fenced ```sql blocks of a Markdown file, each with the number of
/// the `## N.` heading above it (0 before the first numbered heading).
pub fn sql_blocks(markdown: &str) -> Vec<(u32, String)> {
    let mut blocks = Vec::new();
    let mut heading = 0;
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        if let Some(sql) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                blocks.push((heading, current.take().unwrap_or_default()));
            } else {
                sql.push_str(line);
                sql.push('\n');
            }
        } else if line.trim_start().starts_with("```sql") {
            current = Some(String::new());
        } else if let Some(rest) = line.strip_prefix("## ") {
            if let Some(number) = rest.split('.').next().and_then(|n| n.parse().ok()) {
                heading = number;
            }
        }
    }
    blocks
}

/// The queries of docs/queries.md (see [`sql_blocks`]).
pub fn cookbook() -> Vec<(u32, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/queries.md");
    sql_blocks(&std::fs::read_to_string(path).expect("read docs/queries.md"))
}
