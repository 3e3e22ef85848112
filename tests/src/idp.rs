//! tollgate's development identity provider, run as its own process.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{free_port, port_open, tollgate_bin, wait_for};

/// The tenant the tests' tokens come from.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The audience (tollgate's app id URI) the tests' tokens are issued for.
pub const AUDIENCE: &str = "api://tollgate-dev";

pub struct DevIdp {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub listen: SocketAddr,
}

impl DevIdp {
    /// Starts an IdP with a fresh signing key.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tollgate-idp-").tempdir()?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(tollgate_bin())
            .args(["dev", "idp", "--dir"])
            .arg(dir.path())
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("idp.log"))?)
            .spawn()
            .context("start `tollgate dev idp`")?;
        let idp = DevIdp {
            dir,
            child: Some(child),
            listen,
        };
        wait_for(
            "the development IdP to listen",
            Duration::from_secs(20),
            || port_open(listen),
        )?;
        Ok(idp)
    }

    /// A key directory that no running IdP publishes: tokens minted from it
    /// are signed by a key tollgate cannot know.
    pub fn rogue_key_dir() -> Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix("tollgate-rogue-idp-")
            .tempdir()?)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn jwks_uri(&self) -> String {
        format!("http://{}/{TENANT}/discovery/v2.0/keys", self.listen)
    }

    pub fn jwks_file(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    /// Mints a token for `oid` with extra `tollgate dev token` arguments.
    pub fn token(&self, oid: &str, extra: &[&str]) -> Result<String> {
        mint(self.dir.path(), oid, extra)
    }
}

/// Mints a token with the key kept in `key_dir`.
pub fn mint(key_dir: &Path, oid: &str, extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["dev", "token", "--dir"])
        .arg(key_dir)
        .args(["--tenant", TENANT, "--oid", oid])
        .args(extra);
    if !extra.contains(&"--audience") {
        cmd.args(["--audience", AUDIENCE]);
    }
    let out = cmd.output().context("run `tollgate dev token`")?;
    if !out.status.success() {
        bail!(
            "tollgate dev token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Drop for DevIdp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
