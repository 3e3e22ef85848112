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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let _ = tollgate::config::Config::load(&config)?;
            Ok(())
        }
    }
}
