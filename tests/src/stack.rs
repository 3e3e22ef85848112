//! The whole path in one value: a PostgreSQL server, the development IdP
//! and tollgate protecting the server for one agent cgroup.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::{
    duckdb, wait_for, AgentCgroup, AgentSession, DevIdp, Gateway, GatewayConfig, Postgres,
};

pub struct Stack {
    // Dropped in this order: the gateway before the servers it talks to.
    pub gateway: Gateway,
    pub idp: DevIdp,
    pub postgres: Postgres,
}

impl Stack {
    pub fn start() -> Result<Self> {
        Self::start_with(Postgres::start()?, |_| {})
    }

    /// The stack with `policy` as the `[policy]` (and `[identity.roles]`) TOML.
    pub fn start_with_policy(policy: &str) -> Result<Self> {
        Self::start_with(Postgres::start()?, |config| {
            config.policy = policy.to_owned()
        })
    }

    /// The whole path around a given server, with the gateway's
    /// configuration adjusted by `customize` before it starts.
    pub fn start_with(
        postgres: Postgres,
        customize: impl FnOnce(&mut GatewayConfig),
    ) -> Result<Self> {
        let idp = DevIdp::start()?;
        let (dir, mut config) = Gateway::config_for(
            postgres.address(),
            &postgres.gateway_user,
            &postgres.gateway_password,
            idp.jwks_uri(),
        )?;
        customize(&mut config);
        let gateway = Gateway::start(dir, config)?;
        Ok(Stack {
            gateway,
            idp,
            postgres,
        })
    }

    /// psql run as an agent: inside the agent cgroup, connecting to the
    /// server's real address with the token as its password.
    pub fn agent_psql(&self, token: &str, sql: &str) -> Command {
        let mut cmd = AgentCgroup::command(&self.gateway.config.agent_cgroup, "psql");
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={} user=agent dbname=orders connect_timeout=5 sslmode=disable",
                self.postgres.port
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", token);
        cmd
    }

    /// One psycopg connection as an agent, kept open across statements
    /// (see [`AgentSession`]).
    pub fn agent_session(&self, token: &str) -> Result<AgentSession> {
        AgentSession::open(&self.gateway.config.agent_cgroup, self.postgres.port, token)
    }

    /// A raw protocol login through the agent cgroup (see tests/python/pg_login.py).
    pub fn agent_login(&self, password: &str) -> Result<Value> {
        self.agent_login_as("agent", "orders", password)
    }

    /// [`Self::agent_login`] with the startup's user and database.
    pub fn agent_login_as(&self, user: &str, database: &str, password: &str) -> Result<Value> {
        self.run_pg_login(&[user, database, password])
    }

    /// `count` raw logins with `password`, one after another, through the
    /// agent cgroup: how many of each answer came (see
    /// tests/python/pg_login.py).
    pub fn agent_logins(&self, password: &str, count: usize) -> Result<Value> {
        self.run_pg_login(&["agent", "orders", password, &count.to_string()])
    }

    fn run_pg_login(&self, args: &[&str]) -> Result<Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_login.py");
        let out = AgentCgroup::command(&self.gateway.config.agent_cgroup, &duckdb::python())
            .arg(script)
            .args(["127.0.0.1", &self.postgres.port.to_string()])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_login.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Rows of the audit matching `sql` over the view `audit`, waiting up to
    /// `timeout` for at least `want` rows (segments close on a short timer).
    pub fn audit_rows(&self, sql: &str, want: usize, timeout: Duration) -> Result<Vec<Value>> {
        let mut rows = Vec::new();
        let dir = self.gateway.audit_dir().to_path_buf();
        let waited = wait_for("audit rows", timeout, || {
            rows = duckdb::query(&dir, sql).unwrap_or_default();
            rows.len() >= want
        });
        if waited.is_err() {
            bail!(
                "expected at least {want} audit rows for {sql:?}, found {}; gateway log:\n{}",
                rows.len(),
                self.gateway.log()
            );
        }
        Ok(rows)
    }
}
