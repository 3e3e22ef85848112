//! `cargo xtask`: everything a developer or CI runs.
//!
//! - `setup`: installs what a fresh host lacks (idempotent; seconds when done)
//! - `test`: setup, build, then the whole test suite
//! - `demo`: setup, build, then a local PostgreSQL, the development identity
//!   provider and tollgate, with psql run as an agent and the audit printed
//!   through DuckDB

mod bench;
mod bench_pinning;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything tollgate needs to build and test on this host.
    Setup,
    /// Set up, build and run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then run tollgate on a demo configuration and show the audit.
    Demo,
    /// What the kernel programs cost: connect() latency and loopback throughput.
    BenchPinning,
    /// pgbench direct vs PgBouncer vs tollgate (release build) vs a bare
    /// relay, in one run.
    Bench {
        /// Seconds per pgbench run.
        #[arg(long)]
        seconds: Option<u32>,
        /// Runs of each of direct, PgBouncer, tollgate and the bare relay,
        /// taken in turn;
        /// the table gives medians.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Client counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
        clients: Vec<u32>,
        /// Workloads to run: select-only, tpcb (comma separated).
        #[arg(long, value_delimiter = ',', default_values = ["select-only", "tpcb"])]
        workloads: Vec<String>,
        /// tollgate's `[audit] durability` for the run.
        #[arg(long, default_value = "read_parallel")]
        durability: String,
        /// Put tollgate's audit directory here (e.g. on its own device)
        /// instead of the scratch directory of the run.
        #[arg(long)]
        audit_dir: Option<PathBuf>,
        /// Benchmark this tollgate binary instead of building the tree's
        /// (to compare two builds in turn on a noisy machine).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Demo => {
            setup::run()?;
            let binary = build_gateway()?;
            demo::run(&binary)
        }
        Task::BenchPinning => {
            setup::run()?;
            let binary = build_gateway()?;
            bench_pinning::run(&binary)
        }
        Task::Bench {
            seconds,
            rounds,
            clients,
            workloads,
            durability,
            audit_dir,
            binary,
        } => {
            setup::run()?;
            step("building the bare relay (release)");
            run_checked(cargo().args([
                "build",
                "--release",
                "--package",
                "gateway",
                "--example",
                "bare_relay",
            ]))?;
            let bare_relay = target_dir().join("release/examples/bare_relay");
            let binary = match binary {
                Some(binary) => binary,
                None => {
                    step("building tollgate (release)");
                    run_checked(cargo().args([
                        "build",
                        "--release",
                        "--package",
                        "gateway",
                        "--bin",
                        "tollgate",
                    ]))?;
                    target_dir().join("release/tollgate")
                }
            };
            bench::run(
                &binary,
                &bare_relay,
                &bench::Options {
                    seconds: seconds.unwrap_or(bench::SECONDS),
                    rounds,
                    clients,
                    workloads,
                    durability,
                    audit_dir,
                },
            )
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Builds kept across clones of the project on one host, so CI and later
/// sessions reuse what was built before.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tollgate/target"))
}

pub fn step(message: &str) {
    eprintln!("==> {message}");
}

pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    // The stable toolchain builds everything but the kernel programs,
    // whatever toolchain a reduced PATH would otherwise find.
    cmd.arg("+stable");
    cmd.current_dir(root());
    cmd.env("CARGO_TARGET_DIR", target_dir());
    cmd
}

pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build_gateway() -> Result<PathBuf> {
    step("building tollgate (kernel programs included)");
    run_checked(cargo().args(["build", "--package", "gateway", "--bin", "tollgate"]))?;
    Ok(target_dir().join("debug/tollgate"))
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    let binary = build_gateway()?;
    step("running the test suite");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]);
    cmd.env("TOLLGATE_BIN", &binary);
    cmd.env("TOLLGATE_PYTHON", setup::python());
    cmd.args(args);
    run_checked(&mut cmd)
}
