//! A throwaway PostgreSQL 15 server.

use std::{
    fs,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{free_port, wait_for};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running server on 127.0.0.1 with a superuser `postgres`, a login role
/// for the gateway, and a database `orders` with a small table.
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
    pub superuser_password: String,
    /// The credential tollgate presents upstream.
    pub gateway_user: String,
    pub gateway_password: String,
}

impl Postgres {
    pub fn start() -> Result<Self> {
        Self::start_listening("127.0.0.1", &[])
    }

    /// A server that also listens on IPv6 loopback (`::1`).
    pub fn start_dual_stack() -> Result<Self> {
        Self::start_listening("127.0.0.1,::1", &[])
    }

    /// A server with extra `-c name=value` settings. Files the settings
    /// name must be readable by the postgres user ([`Postgres::give`]).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        Self::start_listening("127.0.0.1", settings)
    }

    fn start_listening(listen_addresses: &str, settings: &[(&str, &str)]) -> Result<Self> {
        let (uid, gid) = postgres_ids()?;
        let dir = tempfile::Builder::new()
            .prefix("tollgate-pg-")
            .tempdir_in("/tmp")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        let superuser_password = "pg-super-secret".to_owned();
        fs::write(&pwfile, &superuser_password)?;
        chown(dir.path(), uid, gid)?;
        chown(&pwfile, uid, gid)?;

        let out = Command::new(format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .uid(uid)
            .gid(gid)
            .output()
            .context("run initdb (is PostgreSQL 15 installed? `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }

        let port = free_port();
        let log = fs::File::create(dir.path().join("postgres.log"))?;
        chown(&dir.path().join("postgres.log"), uid, gid)?;
        let child = Command::new(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-c")
            .arg(format!("listen_addresses={listen_addresses}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "log_connections=on", "-c", "fsync=off"])
            .args(
                settings
                    .iter()
                    .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")]),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .uid(uid)
            .gid(gid)
            .spawn()
            .context("start postgres")?;

        let mut pg = Postgres {
            dir,
            child,
            port,
            superuser_password,
            gateway_user: "tollgate_gateway".into(),
            gateway_password: "gateway-credential-secret".into(),
        };
        let addr = pg.address();
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || {
                pg.superuser_sql("postgres", "SELECT 1")
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            },
        )
        .with_context(|| format!("PostgreSQL on {addr}; log: {}", pg.log()))?;
        let setup = format!(
            "CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'",
            user = pg.gateway_user,
            password = pg.gateway_password
        );
        pg.superuser_sql_ok("postgres", &setup)?;
        // CREATE DATABASE cannot share psql -c's transaction with others.
        pg.superuser_sql_ok("postgres", "CREATE DATABASE orders")?;
        pg.superuser_sql_ok(
            "orders",
            "CREATE TABLE customers (id int PRIMARY KEY, name text, email text);
             INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Grace', 'grace@example.com'), (3, 'Edsger', 'edsger@example.com');",
        )?;
        // Reap the child's exit status if it dies, so a failure says why.
        if let Ok(Some(status)) = pg.child.try_wait() {
            bail!("postgres exited: {status}; log: {}", pg.log());
        }
        Ok(pg)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's IPv6 loopback address (only with [`Self::start_dual_stack`]).
    pub fn address_v6(&self) -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.port))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log (connection lines included).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// How many connections the server has received so far, from its log.
    pub fn connections_received(&self) -> usize {
        self.log().matches("connection received").count()
    }

    /// psql as the superuser over TCP, straight to the server.
    pub fn superuser_sql(&self, database: &str, sql: &str) -> Result<Output> {
        Ok(Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={database} connect_timeout=5",
                self.port
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", &self.superuser_password)
            .output()?)
    }

    pub fn superuser_sql_ok(&self, database: &str, sql: &str) -> Result<String> {
        let out = self.superuser_sql(database, sql)?;
        if !out.status.success() {
            bail!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown; the data is thrown away anyway.
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let _ = self.child.wait();
    }
}

/// Hands a file to the postgres user with mode 0600 (as PostgreSQL
/// demands of a TLS key).
pub fn give(path: &Path) -> Result<()> {
    let (uid, gid) = postgres_ids()?;
    chown(path, uid, gid)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!("no `postgres` user: install PostgreSQL with `cargo xtask setup`");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}
