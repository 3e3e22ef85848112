//! `tollgate`: the command line. Each subcommand is a thin call into the
//! library; the work lives in the stage modules.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{info, warn};

use tollgate::{
    audit::AuditLog,
    config::Config,
    evidence::{self, AgentCgroupInfo, ConfigSnapshot, Evidence, ProtectedTarget},
    identity::Verifier,
    pin::{self, Pinning},
    policy::Policy,
    proxy::{self, Shared},
};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Auditable, unavoidable access to production for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: pin the agent cgroups, serve every target, audit.
    Run {
        /// The configuration file (see docs/configuration.md).
        #[arg(long)]
        config: PathBuf,
        /// Write this file once every listener is up and the redirect is in place.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The configuration file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove the pinned kernel programs: agent connections go direct again.
    Unpin {
        /// The configuration file, for its pin directory (without it,
        /// /sys/fs/bpf/tollgate).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The audit store: offline verification.
    Audit {
        #[command(subcommand)]
        command: tollgate::audit::AuditCommand,
    },
    /// Generate the Ed25519 key that signs audit checkpoints (PATH and PATH.pub).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Key name in the signed checkpoints.
        #[arg(long, default_value = "tollgate")]
        name: String,
    },
    /// Reconcile the kernel's evidence with the audit, offline: every
    /// connection to a protected target must be an audited gateway
    /// upstream, and no evidence may have been lost. Exits non-zero on any
    /// bypass or loss.
    Verify {
        /// The audit directory (the `[audit] dir`, or a copy of it).
        dir: PathBuf,
        /// The checkpoint signer's public key.
        #[arg(long)]
        public_key: PathBuf,
        /// Only judge events at or after this time (Unix ms or YYYY-MM-DDTHH:MM:SSZ).
        #[arg(long)]
        from: Option<String>,
        /// Only judge events at or before this time.
        #[arg(long)]
        to: Option<String>,
        /// Also write the full report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Skip the integrity check of both streams (chain, segments,
        /// signed checkpoints): reconciliation only.
        #[arg(long)]
        reconcile_only: bool,
        /// Fail if either stream's latest checkpoint is older than this
        /// (for a directory just collected from a running daemon, which
        /// signs on a timer: an older one means its tail was cut off).
        #[arg(long, conflicts_with = "reconcile_only")]
        max_checkpoint_age_secs: Option<u64>,
    },
    /// The kernel programs: what is pinned and attached where.
    Pin {
        #[command(subcommand)]
        command: PinCommand,
    },
    /// Development tools: a local identity provider and token minting.
    Dev {
        #[command(subcommand)]
        command: tollgate::dev::DevCommand,
    },
}

#[derive(Subcommand)]
enum PinCommand {
    /// List the pinned programs per cgroup, with program and link ids.
    Status {
        /// The configuration (for the pin directory and cgroup names).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, ready_file } => {
            runtime().and_then(|rt| rt.block_on(run(config, ready_file)))
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Unpin { config } => unpin(config),
        Command::Verify {
            dir,
            public_key,
            from,
            to,
            report,
            reconcile_only,
            max_checkpoint_age_secs,
        } => {
            let opts = match verify_options(from, to, reconcile_only, max_checkpoint_age_secs) {
                Ok(opts) => opts,
                Err(err) => {
                    eprintln!("tollgate: {err:#}");
                    return ExitCode::from(2);
                }
            };
            return match evidence::verify::run(&dir, &public_key, &opts, report.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(err) => {
                    eprintln!("tollgate: {err:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Pin {
            command: PinCommand::Status { config, json },
        } => pin_status(config, json),
        Command::Dev { command } => {
            runtime().and_then(|rt| rt.block_on(tollgate::dev::run(command)))
        }
        Command::Audit { command } => return exit(tollgate::audit::run_command(command)),
        Command::Keygen { out, name } => tollgate::audit::keygen(&out, &name),
    };
    exit(result.map(|()| ExitCode::SUCCESS))
}

fn exit(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tollgate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything `run` would refuse at start before it touches the network,
/// the kernel or the audit directory: the file itself, the identity
/// settings and key file, each target's TLS material.
fn check_config(path: &Path) -> Result<()> {
    load_checked(path)?;
    println!("{}: ok", path.display());
    Ok(())
}

/// The configuration at `path`, with everything checked that can be
/// without the network or the audit directory: the identity settings (and
/// a `jwks_file`'s keys), the audit signing key and auditor group, each
/// target's TLS files. `run` checks this before it changes anything on
/// the host (the pins), `check-config` checks nothing else. Returns the
/// targets too, their TLS material loaded, for `run` to serve.
fn load_checked(path: &Path) -> Result<(Config, Vec<Arc<proxy::Target>>)> {
    let config = Config::load(path)?;
    for (target, twin) in config.unprotected_loopback_twins() {
        warn!(
            target = %target,
            unprotected = %twin,
            "a server on this host usually listens on both loopback addresses: agents can reach this \
             target's server at {twin}, which no target protects; add a target for it, or set \
             pin.egress_default = \"deny\""
        );
    }
    if config.pin.agent_cgroups.is_empty() {
        warn!("no agent cgroups configured: nothing is redirected to tollgate (the evidence probe still records every connection)");
    }
    for target in &config.targets {
        if !target.path_is_protected() {
            warn!(
                target = %target.name,
                address = %target.address,
                "the connection to this target is not encrypted (no upstream_tls): whoever is on \
                 the path can read the rows, and can relay SCRAM to the server and then speak in \
                 tollgate's session, around policy and audit; set upstream_tls"
            );
        }
    }
    Verifier::check(&config.identity)
        .with_context(|| format!("{}: identity provider", path.display()))?;
    tollgate::audit::check_config(&config.audit)
        .with_context(|| format!("{}: audit", path.display()))?;
    let targets = config
        .targets
        .iter()
        .map(|target| {
            proxy::Target::new(target.clone())
                .map(Arc::new)
                .with_context(|| path.display().to_string())
        })
        .collect::<Result<_>>()?;
    Ok((config, targets))
}

/// Raises the open-file limit to its hard limit (a shell's default soft
/// limit, often 1 024, runs out at about 500 sessions), and warns when
/// even that is below what the targets' `max_connections` may take: two
/// descriptors a session (the agent's and the target's). Past the limit
/// new sessions fail, and so do the audit store's new files, which
/// refuses every statement.
fn raise_open_file_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not read the open-file limit");
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = config.descriptors_needed();
    if limit.rlim_cur != libc::RLIM_INFINITY && needed > limit.rlim_cur {
        warn!(
            limit = limit.rlim_cur,
            needed,
            "the open-file limit is below what the targets' max_connections may take (two a session): \
             sessions past it fail, and so do the audit store's new files, which refuses every statement; \
             raise LimitNOFILE or lower max_connections"
        );
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(tollgate::proxy::RUNTIME_THREAD_STACK_BYTES)
        .build()?)
}

async fn run(config_path: PathBuf, ready_file: Option<PathBuf>) -> Result<()> {
    // SIGHUP would otherwise end the daemon at once (its default action),
    // without ending its sessions or stopping its audit store, or while it
    // pins: taken from the start, and said to do nothing.
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())?;
    // A configuration that cannot work stops the start before anything is
    // pinned: `run` refuses exactly what `check-config` does.
    let (config, targets) = load_checked(&config_path)?;
    raise_open_file_limit(&config);
    // Another daemon on the same pins, agent cgroups or audit directory:
    // stop before anything changes (its redirect, its programs, its
    // listeners' ports). Held until the daemon ends.
    let pin_lock =
        pin::lock(&config.pin.bpffs_dir, &config.pin.agent_cgroups).context("pinning")?;
    let audit_lock = AuditLog::lock(&config.audit).context("audit store")?;
    let protected = config.protected();
    let egress = config.egress_policy().map_err(anyhow::Error::msg)?;

    // Listeners before the redirect: tollgate installs it only once it
    // holds every listener port, so it never sends agents to a port some
    // other process took (after a reboot nothing is pinned, and nothing
    // stops a process from binding the port before tollgate starts). On a
    // restart the pinned bind programs have kept agents off the ports.
    let mut listeners = Vec::new();
    for target in targets {
        let listen = target.config.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("target {}: listen on {listen}", target.config.name))?;
        listeners.push((target, listener));
    }

    // The redirect next, before anything that waits on the network or the
    // disk (the identity provider's keys, the audit store): should one of
    // those fail or hang, agents' connections wait in the listeners'
    // backlog or are refused, on a first start as on a restart, and never
    // go direct.
    // Noted before the kernel's maps change: from here until the config
    // record, either this start's targets or the last one's may be in force.
    let installing_since_ms = tollgate::proxy::now_millis();
    // As locked: the cgroups resolved, so that what is checked and pinned
    // is the cgroup itself, not a symlink's directory.
    let mut pinning = Pinning::install(&pin_lock, &protected, &config.guarded_ports(), &egress)
        .context("pinning")?;

    let verifier = Verifier::from_config(&config.identity)
        .await
        .context("identity provider")?;
    let audit = AuditLog::open_locked(&config.audit, audit_lock)
        .await
        .context("audit store")?;
    let replaced_targets = pinning.replaced_targets().to_vec();
    let evidence = match pinning.take_evidence() {
        Some(handles) => Some(
            Evidence::start(
                &config.audit,
                handles,
                config_snapshot(&config, installing_since_ms, replaced_targets)?,
                std::time::Duration::from_secs(config.pin.loss_interval_secs),
            )
            .await
            .context("evidence stream")?,
        ),
        None => None,
    };
    let pinning = Some(std::sync::Mutex::new(pinning));

    let shared = Arc::new(Shared {
        verifier,
        policy: Policy::new(&config.policy),
        audit: audit.clone(),
        pinning,
        postgres_cancel_keys: Default::default(),
        postgres_held_whole: Default::default(),
        postgres_parsing: Default::default(),
        postgres_named: Default::default(),
        postgres_catalogs: Default::default(),
        refusals: Default::default(),
        sessions: Default::default(),
    });
    // SIGTERM keeps its default action until the start is done: a start
    // that hangs (on the identity provider, say) still ends on it. Taken
    // before anyone is told the daemon is ready, who may then stop it.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // Before the sessions start (the listeners already hold what comes):
    // a failure here ends the start before any session runs (what the
    // audit store and the evidence stream took is in their WAL, replayed
    // at the next start).
    if let Some(path) = ready_file {
        std::fs::write(&path, b"ready\n").with_context(|| format!("write {}", path.display()))?;
    }
    tokio::spawn(shared.clone().write_refusal_summaries());
    for (target, listener) in listeners {
        info!(target = %target.name, listen = %target.listen, address = %target.address, "serving");
        tokio::spawn(proxy::serve(target, listener, shared.clone()));
    }
    // Not fatal: the daemon already serves, and a systemd that waits for
    // the message stops the unit itself when it does not come in time (a
    // NOTIFY_SOCKET inherited from elsewhere would otherwise stop a
    // daemon nobody waits on).
    if let Err(err) = notify_systemd_ready() {
        warn!(error = %err, "could not tell systemd that tollgate is ready");
    }
    info!("tollgate ready");

    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => warn!(
                config = %config_path.display(),
                "SIGHUP: tollgate does not reload its configuration; restart it to apply a changed file"
            ),
        }
    }
    info!(
        sessions = shared.sessions.running(),
        "stopping: the redirect stays pinned, agent connections are refused until tollgate is back"
    );
    // Sessions end first, each telling its agent why and writing the
    // outcomes of the requests it still had in flight; the audit store
    // stops once they have, so those records are not refused.
    shared.sessions.stop();
    if tokio::time::timeout(SESSIONS_END_WITHIN, shared.sessions.ended())
        .await
        .is_err()
    {
        warn!(
            sessions = shared.sessions.running(),
            "sessions still running {} s after the stop (logging in, or an agent not reading); the audit store stops now and refuses what they write after it",
            SESSIONS_END_WITHIN.as_secs()
        );
    }
    if let Some(evidence) = evidence {
        evidence.shutdown().await;
    }
    shared.flush_last_refusal_summaries();
    audit.shutdown().await;
    Ok(())
}

/// How long a stopping daemon waits for its sessions to end: a session
/// ends at once, between two messages of its agent's, unless its agent
/// does not read what it is sent (then its writes wait on the socket) or
/// it is still logging in.
const SESSIONS_END_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Tells systemd (`Type=notify`, deploy/tollgate.service) that the
/// redirect is in place and every listener serves: units ordered
/// `After=tollgate.service` start only then, so no agent runs before the
/// pins exist. Nothing to do when not started by systemd.
fn notify_systemd_ready() -> Result<()> {
    use std::os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    };
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let address = match path.as_bytes().strip_prefix(b"@") {
        // systemd names an abstract socket with a leading '@'.
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    }
    .with_context(|| format!("NOTIFY_SOCKET {}", path.to_string_lossy()))?;
    let socket = UnixDatagram::unbound().context("socket for the systemd notification")?;
    socket
        .send_to_addr(b"READY=1", &address)
        .with_context(|| format!("notify systemd at {}", path.to_string_lossy()))?;
    Ok(())
}

/// What the evidence stream records about this configuration at start.
/// `installing_since_ms` and `replaced_targets` come from the pinning of
/// this start (see `ConfigSnapshot`).
fn config_snapshot(
    config: &Config,
    installing_since_ms: i64,
    replaced_targets: Vec<std::net::SocketAddr>,
) -> Result<ConfigSnapshot> {
    use std::os::unix::fs::MetadataExt;
    let agent_cgroups = config
        .pin
        .agent_cgroups
        .iter()
        .map(|path| {
            let id = std::fs::metadata(path)
                .with_context(|| format!("agent cgroup {}", path.display()))?
                .ino();
            Ok(AgentCgroupInfo {
                path: path.display().to_string(),
                id,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ConfigSnapshot {
        protected_targets: config
            .targets
            .iter()
            .map(|t| ProtectedTarget {
                name: t.name.clone(),
                address: t.address,
                listen: t.listen,
            })
            .collect(),
        agent_cgroups,
        gateway_pid: std::process::id(),
        gateway_cgroup_id: pin::own_cgroup_id().unwrap_or(0),
        egress_default_deny: config.pin.egress_default == tollgate::config::EgressDefault::Deny,
        boot_id: evidence::boot_id(),
        booted_at_ms: evidence::booted_at_ms(),
        installing_since_ms: Some(installing_since_ms),
        replaced_targets,
        probe_was_pinned: None,
    })
}

fn verify_options(
    from: Option<String>,
    to: Option<String>,
    reconcile_only: bool,
    max_checkpoint_age_secs: Option<u64>,
) -> Result<evidence::verify::Options> {
    Ok(evidence::verify::Options {
        from_ms: from
            .as_deref()
            .map(evidence::verify::parse_time)
            .transpose()?,
        to_ms: to
            .as_deref()
            .map(evidence::verify::parse_time)
            .transpose()?,
        require_integrity: !reconcile_only,
        max_checkpoint_age_secs,
    })
}

fn pin_status(config: Option<PathBuf>, json: bool) -> Result<()> {
    let pin_config = match config {
        Some(path) => Config::read_pin(&path)?,
        None => tollgate::config::PinConfig::default(),
    };
    let programs = pin::status::status(&pin_config.bpffs_dir, &pin_config.agent_cgroups)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&programs)?);
    } else {
        print!("{}", pin::status::render(&pin_config.bpffs_dir, &programs));
    }
    Ok(())
}

fn unpin(config: Option<PathBuf>) -> Result<()> {
    let dir = match config {
        Some(path) => Config::read_pin(&path)?.bpffs_dir,
        None => tollgate::config::PinConfig::default().bpffs_dir,
    };
    pin::unpin(&dir)
}
