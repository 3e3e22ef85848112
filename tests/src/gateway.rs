//! The tollgate daemon under test, and the agent cgroups it pins.

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{free_port, idp, tollgate_bin, wait_for};

/// What a test configures; [`GatewayConfig::toml`] writes the file.
pub struct GatewayConfig {
    pub target_name: String,
    pub target_address: SocketAddr,
    pub listen: SocketAddr,
    pub upstream_user: String,
    pub upstream_password: String,
    pub agent_cgroup: PathBuf,
    /// A second agent cgroup inside `agent_cgroup`, pinned too.
    pub nested_agent_cgroup: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub audit_dir: PathBuf,
    /// Checkpoint signing key, made with `tollgate keygen` outside the audit dir.
    pub signing_key: PathBuf,
    pub jwks_uri: String,
    /// `[policy]` and `[identity.roles]` TOML appended to the file.
    pub policy: String,
    /// Extra `[audit]` lines, e.g. `segment_max_age_secs = 1`.
    pub audit_extra: String,
    /// Extra lines inside the `[[target]]` table.
    pub target_extra: String,
    /// More `[pin]` keys, one per line (e.g. `egress_default = "deny"`).
    pub extra_pin_toml: String,
}

/// The policy the tests run under unless they say otherwise: any
/// authenticated agent may read, write and use transactions; DDL, DCL,
/// admin statements and the built-in dangerous statements are refused;
/// `public.secrets` is off limits.
pub const DEFAULT_POLICY: &str = r#"
[[policy.grant]]
name = "agents"
roles = ["*"]
kinds = ["read", "write", "transaction", "utility"]
deny_tables = ["public.secrets"]
"#;

impl GatewayConfig {
    /// Writes the file to `path`, and the signing key it names with
    /// `tollgate keygen` unless one is there.
    pub fn write(&self, path: &Path) -> Result<()> {
        fs::write(path, self.toml())?;
        if !self.signing_key.exists() {
            let out = Command::new(tollgate_bin())
                .args(["keygen", "--out"])
                .arg(&self.signing_key)
                .output()?;
            if !out.status.success() {
                bail!(
                    "tollgate keygen failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    pub fn toml(&self) -> String {
        format!(
            r#"# Written by the end-to-end tests.
[pin]
agent_cgroups = [{cgroups}]
bpffs_dir = "{bpffs}"
{extra_pin}

[identity]
tenants = ["{tenant}"]
audiences = ["{audience}"]
jwks_uri = "{jwks}"
development_idp = true

[audit]
dir = "{audit}"
signing_key = "{signing_key}"
{audit_extra}

[[target]]
name = "{name}"
protocol = "postgres"
address = "{address}"
listen = "{listen}"
credential = {{ user = "{user}", password = "{password}" }}
databases = ["orders"]
{target_extra}
{policy}
"#,
            cgroups = std::iter::once(&self.agent_cgroup)
                .chain(&self.nested_agent_cgroup)
                .map(|c| format!("\"{}\"", c.display()))
                .collect::<Vec<_>>()
                .join(", "),
            bpffs = self.bpffs_dir.display(),
            extra_pin = self.extra_pin_toml,
            tenant = idp::TENANT,
            audience = idp::AUDIENCE,
            jwks = self.jwks_uri,
            audit = self.audit_dir.display(),
            signing_key = self.signing_key.display(),
            audit_extra = self.audit_extra,
            name = self.target_name,
            address = self.target_address,
            listen = self.listen,
            user = self.upstream_user,
            password = self.upstream_password,
            policy = self.policy,
            target_extra = self.target_extra,
        )
    }
}

/// A running `tollgate run`.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: GatewayConfig,
    child: Option<Child>,
}

impl Gateway {
    /// A configuration for one PostgreSQL target in a fresh temporary
    /// directory, with a fresh agent cgroup and pin directory.
    pub fn config_for(
        target: SocketAddr,
        upstream_user: &str,
        upstream_password: &str,
        jwks_uri: String,
    ) -> Result<(tempfile::TempDir, GatewayConfig)> {
        let dir = tempfile::Builder::new().prefix("tollgate-gw-").tempdir()?;
        let unique = unique_name();
        let config = GatewayConfig {
            target_name: "orders-db".into(),
            target_address: target,
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            upstream_user: upstream_user.into(),
            upstream_password: upstream_password.into(),
            agent_cgroup: AgentCgroup::root().join(&unique),
            nested_agent_cgroup: None,
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(&unique),
            audit_dir: dir.path().join("audit"),
            signing_key: dir.path().join("signing.key"),
            jwks_uri,
            policy: DEFAULT_POLICY.into(),
            audit_extra: String::new(),
            target_extra: String::new(),
            extra_pin_toml: String::new(),
        };
        Ok((dir, config))
    }

    /// Starts the daemon and waits until it says it is ready.
    pub fn start(dir: tempfile::TempDir, config: GatewayConfig) -> Result<Self> {
        let config_path = dir.path().join("tollgate.toml");
        config.write(&config_path)?;
        let mut gateway = Gateway {
            dir,
            config_path,
            config,
            child: None,
        };
        gateway.restart()?;
        Ok(gateway)
    }

    /// (Re)starts the daemon on the same configuration.
    pub fn restart(&mut self) -> Result<()> {
        let ready = self.dir.path().join("ready");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(tollgate_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info,tollgate=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start `tollgate run`")?;
        self.child = Some(child);
        let started = wait_for("tollgate to be ready", Duration::from_secs(30), || {
            ready.exists() || self.exited()
        });
        if started.is_err() || self.exited() {
            bail!("tollgate did not start; log:\n{}", self.log());
        }
        Ok(())
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(Some(_))))
            .unwrap_or(true)
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn audit_dir(&self) -> &Path {
        &self.config.audit_dir
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean stop (open audit segments are closed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// The public half of the checkpoint signing key.
    pub fn public_key(&self) -> PathBuf {
        PathBuf::from(format!("{}.pub", self.config.signing_key.display()))
    }

    /// `tollgate audit verify` over the audit directory: (success, output).
    pub fn verify_audit(&self) -> Result<(bool, String)> {
        let public_key = self.public_key();
        let out = Command::new(tollgate_bin())
            .args(["audit", "verify"])
            .arg(&self.config.audit_dir)
            .arg("--public-key")
            .arg(public_key)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    pub fn unpin(&self) -> Result<()> {
        let out = Command::new(tollgate_bin())
            .arg("unpin")
            .arg("--config")
            .arg(&self.config_path)
            .output()?;
        if !out.status.success() {
            bail!(
                "tollgate unpin failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        let _ = self.unpin();
        if let Some(nested) = &self.config.nested_agent_cgroup {
            let _ = fs::remove_dir(nested);
        }
        let _ = fs::remove_dir(&self.config.agent_cgroup);
    }
}

fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tollgate-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup v2 directory whose processes are agents.
pub struct AgentCgroup;

impl AgentCgroup {
    /// Where cgroup v2 is mounted on this host.
    pub fn root() -> PathBuf {
        let unified = PathBuf::from("/sys/fs/cgroup/unified");
        if unified.join("cgroup.procs").exists() {
            unified
        } else {
            PathBuf::from("/sys/fs/cgroup")
        }
    }

    /// A command that joins `cgroup` before it execs, so every socket it
    /// makes belongs to the agent cgroup.
    pub fn command(cgroup: &Path, program: &str) -> Command {
        let procs = cgroup.join("cgroup.procs");
        let mut cmd = Command::new(program);
        // SAFETY: the closure only writes a file, which is
        // async-signal-safe enough for a freshly forked child.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        cmd
    }
}
