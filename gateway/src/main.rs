//! `tollgate`: the command line. Each subcommand calls into the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Auditable, unavoidable access for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Audit log tools (verify).
    Audit {
        #[command(subcommand)]
        command: tollgate::audit::AuditCommand,
    },
    /// Generate an Ed25519 checkpoint signing key (PATH and PATH.pub).
    Keygen {
        #[arg(long)]
        out: std::path::PathBuf,
        /// Key name, shown in checkpoint signature lines.
        #[arg(long, default_value = "tollgate")]
        name: String,
    },
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let _ = tollgate::config::Config::load(&config)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Audit { command } => tollgate::audit::run_command(command),
        Command::Keygen { out, name } => {
            tollgate::audit::keygen(&out, &name)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
