//! `cargo xtask demo`: the whole path on this host, in a minute.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use tollgate_tests::{duckdb, Stack};

use crate::step;

const AGENT_OID: &str = "0a9e7c44-1d2b-4c8e-9f00-5e1ec7ab1e00";

pub fn run(binary: &Path) -> Result<()> {
    if !binary.exists() {
        bail!("{} is missing", binary.display());
    }
    std::env::set_var("TOLLGATE_BIN", binary);
    std::env::set_var("TOLLGATE_PYTHON", crate::setup::python());

    step("starting PostgreSQL 15 (initdb in a temporary directory), the development IdP and tollgate");
    let stack = Stack::start()?;
    step(&format!(
        "PostgreSQL listens on {}; tollgate pins agent cgroup {} and serves it on {}",
        stack.postgres.address(),
        stack.gateway.config.agent_cgroup.display(),
        stack.gateway.config.listen
    ));
    eprintln!(
        "--- tollgate configuration ({}) ---",
        stack.gateway.config_path.display()
    );
    eprintln!(
        "{}",
        stack
            .gateway
            .config
            .toml()
            .replace(&stack.postgres.gateway_password, "********")
    );

    let token = stack.idp.token(
        AGENT_OID,
        &["--name", "billing-agent", "--groups", "readers"],
    )?;
    step(&format!(
        "an agent in the cgroup runs psql against PostgreSQL's real address 127.0.0.1:{} with its Entra token as password",
        stack.postgres.port
    ));
    for sql in [
        "SELECT id, name FROM customers ORDER BY id",
        "/* intent: fix a typo */ UPDATE customers SET name = 'Edsger W.' WHERE id = 3",
    ] {
        let out = stack.agent_psql(&token, sql).output().context("run psql")?;
        eprintln!("agent$ psql -c {sql:?}");
        eprint!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    step("an agent with an expired token is refused (SQLSTATE 28000)");
    let expired = stack.idp.token(AGENT_OID, &["--expires-in", "-600"])?;
    let out = stack.agent_psql(&expired, "SELECT 1").output()?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    step("the audit, read with DuckDB from the Parquet files tollgate wrote");
    let sql = "SELECT sequence, strftime(make_timestamp(time * 1000), '%H:%M:%S') AS at, phase, \
               actor_user_uid AS oid, actor_process_name AS process, dst_endpoint_name AS target, \
               query_info_query_string AS statement, status_id, response_rows AS rows, status_detail \
               FROM audit ORDER BY sequence";
    stack.audit_rows(sql, 6, Duration::from_secs(30))?;
    let show = Command::new(duckdb::python())
        .arg("-c")
        .arg(format!(
            "import duckdb; duckdb.sql(\"CREATE VIEW audit AS SELECT * FROM read_parquet('{}/records/**/*.parquet', hive_partitioning=true, union_by_name=true)\"); duckdb.sql({sql:?}).show(max_width=200)",
            stack.gateway.audit_dir().display()
        ))
        .status()?;
    if !show.success() {
        bail!("duckdb failed");
    }
    step("stopping tollgate, then verifying offline what an auditor receives: the audit chain, the signed checkpoints, and the kernel's evidence that nothing went around the gateway");
    let mut stack = stack;
    stack.gateway.stop();
    let verify = Command::new(binary)
        .arg("verify")
        .arg(stack.gateway.audit_dir())
        .arg("--public-key")
        .arg(stack.gateway.public_key())
        .status()?;
    if !verify.success() {
        bail!("tollgate verify found a problem (see above)");
    }
    step("demo done: stopping the IdP and PostgreSQL");
    Ok(())
}
