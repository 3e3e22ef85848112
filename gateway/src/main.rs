//! `tollgate`: the command line. Each subcommand is a thin call into the
//! library; the work lives in the stage modules.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{info, warn};

use tollgate::{
    audit::AuditLog,
    config::Config,
    identity::Verifier,
    pin::{self, Pinning, Protected},
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
        #[arg(long)]
        config: PathBuf,
        /// Write this file once every listener is up and the redirect is in place.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove the pinned kernel programs: agent connections go direct again.
    Unpin {
        /// The pin directory (default: the config's, or /sys/fs/bpf/tollgate).
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
    /// Development tools: a local identity provider and token minting.
    Dev {
        #[command(subcommand)]
        command: tollgate::dev::DevCommand,
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
        Command::CheckConfig { config } => Config::load(&config)
            .map(|_| println!("{}: ok", config.display()))
            .map_err(Into::into),
        Command::Unpin { config } => unpin(config),
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run(config_path: PathBuf, ready_file: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&config_path)?;
    let verifier = Verifier::from_config(&config.identity)
        .await
        .context("identity provider")?;
    let audit = AuditLog::open(&config.audit).await.context("audit store")?;

    // Listeners first: once the redirect is in place, agents are served.
    let mut listeners = Vec::new();
    for target in &config.targets {
        let listener = TcpListener::bind(target.listen)
            .await
            .with_context(|| format!("target {}: listen on {}", target.name, target.listen))?;
        listeners.push((Arc::new(proxy::Target::new(target.clone())?), listener));
    }

    let pinning = if config.pin.agent_cgroups.is_empty() {
        warn!("no agent cgroups configured: nothing is redirected to tollgate");
        None
    } else {
        let protected: Vec<Protected> = config
            .targets
            .iter()
            .map(|t| Protected {
                address: t.address,
                listener: t.listen,
            })
            .collect();
        Some(std::sync::Mutex::new(
            Pinning::install(&config.pin.bpffs_dir, &config.pin.agent_cgroups, &protected)
                .context("pinning")?,
        ))
    };

    let shared = Arc::new(Shared {
        verifier,
        policy: Policy::new(&config.policy),
        audit: audit.clone(),
        pinning,
        postgres_cancel_keys: Default::default(),
    });
    for (target, listener) in listeners {
        info!(target = %target.name, listen = %target.listen, address = %target.address, "serving");
        tokio::spawn(proxy::serve(target, listener, shared.clone()));
    }
    if let Some(path) = ready_file {
        std::fs::write(&path, b"ready\n").with_context(|| format!("write {}", path.display()))?;
    }
    info!("tollgate ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
    info!(
        "stopping: the redirect stays pinned, agent connections are refused until tollgate is back"
    );
    audit.shutdown().await;
    Ok(())
}

fn unpin(config: Option<PathBuf>) -> Result<()> {
    let dir = match config {
        Some(path) => Config::load(&path)?.pin.bpffs_dir,
        None => tollgate::config::PinConfig::default().bpffs_dir,
    };
    pin::unpin(&dir)
}
