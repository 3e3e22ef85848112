//! A PostgreSQL session held open by an agent process, statement by
//! statement (tests/python/pg_session.py): what a long-lived agent does,
//! and what a test needs to see one connection across a change (a full
//! disk, a restart).

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{duckdb, AgentCgroup};

pub struct AgentSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The answer to the login: `{"ok": true}` or the error.
    pub login: Value,
}

impl AgentSession {
    /// Connects as `agent` to `orders` on 127.0.0.1:`port` from inside the
    /// agent cgroup, with `token` as the password.
    pub fn open(cgroup: &Path, port: u16, token: &str) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_session.py");
        let mut child = AgentCgroup::command(cgroup, &duckdb::python())
            .arg(script)
            .args(["127.0.0.1", &port.to_string(), "agent", "orders", token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start pg_session.py")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut session = AgentSession {
            child,
            stdin,
            stdout,
            login: Value::Null,
        };
        session.login = session.answer()?;
        Ok(session)
    }

    /// Runs one statement and returns the answer (see pg_session.py).
    pub fn run(&mut self, sql: &str) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("session closed")?;
        writeln!(stdin, "{}", Value::from(sql))?;
        stdin.flush()?;
        self.answer()
    }

    fn answer(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("pg_session.py ended without answering");
        }
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for AgentSession {
    fn drop(&mut self) {
        // Closing stdin ends the script's loop and its connection.
        self.stdin.take();
        let _ = self.child.wait();
    }
}
