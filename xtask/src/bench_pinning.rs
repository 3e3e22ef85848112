//! `cargo xtask bench-pinning`: what the kernel programs cost.
//!
//! - connect() latency from an agent cgroup (connect4, sock_ops and the
//!   rest attached) against a plain cgroup with no tollgate program, to a
//!   loopback destination that is not protected: the price every agent
//!   connection pays;
//! - loopback TCP throughput with the host-wide evidence programs attached
//!   (tp_btf probe, cgroup_skb at the root) and after they are removed.
//!
//! The measuring program is C (xtask/c/net_bench.c), built here with cc,
//! so interpreter overhead does not drown microseconds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use tollgate_tests::{AgentCgroup, Stack};

use crate::step;

const CONNECTS: &str = "20000";
const STREAM_BYTES: &str = "2000000000";
const ROUNDS: usize = 7;

pub fn run(binary: &Path) -> Result<()> {
    std::env::set_var("TOLLGATE_BIN", binary);
    let bench = build_net_bench()?;
    step("starting PostgreSQL, the development IdP and tollgate (pins an agent cgroup, attaches the evidence programs)");
    let mut stack = Stack::start()?;
    let plain = AgentCgroup::root().join(format!("tollgate-bench-plain-{}", std::process::id()));
    fs::create_dir_all(&plain).with_context(|| format!("create {}", plain.display()))?;

    step(&format!("connect() latency, {ROUNDS} rounds of {CONNECTS} connects, alternating agent and plain cgroups"));
    let mut agent = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..ROUNDS {
        agent.push(measure(
            AgentCgroup::command(&stack.gateway.config.agent_cgroup, path_str(&bench)?)
                .args(["connect", CONNECTS]),
        )?);
        baseline.push(measure(
            AgentCgroup::command(&plain, path_str(&bench)?).args(["connect", CONNECTS]),
        )?);
    }

    step(&format!(
        "loopback TCP throughput, {ROUNDS} rounds of one {STREAM_BYTES}-byte stream with the evidence programs and one without"
    ));
    // Alternating, so a noisy minute hits both sides alike: the programs
    // are removed (stop + unpin) and attached again (restart) every round.
    let mut with_evidence = Vec::new();
    let mut without_evidence = Vec::new();
    for round in 0..ROUNDS {
        with_evidence.push(measure(
            Command::new(&bench).args(["stream", STREAM_BYTES]),
        )?);
        stack.gateway.stop();
        stack.gateway.unpin()?;
        without_evidence.push(measure(
            Command::new(&bench).args(["stream", STREAM_BYTES]),
        )?);
        if round + 1 < ROUNDS {
            stack.gateway.restart()?;
        }
    }
    let _ = fs::remove_dir(&plain);

    let (a, b) = (median(&mut agent), median(&mut baseline));
    let (w, wo) = (median(&mut with_evidence), median(&mut without_evidence));
    println!();
    println!("| measurement | with tollgate's programs | without | difference |");
    println!("| --- | --- | --- | --- |");
    println!("| connect() latency, median of {ROUNDS} x {CONNECTS} | {a:.0} ns | {b:.0} ns | {:+.0} ns |", a - b);
    println!(
        "| loopback TCP throughput, median of {ROUNDS} x {STREAM_BYTES} B | {w:.0} MB/s | {wo:.0} MB/s | {:+.1}% |",
        (w - wo) / wo * 100.0
    );
    println!("\nall rounds: connect agent {agent:?} plain {baseline:?}; stream with {with_evidence:?} without {without_evidence:?}");
    Ok(())
}

fn build_net_bench() -> Result<PathBuf> {
    let source = crate::root().join("xtask/c/net_bench.c");
    let out = crate::target_dir().join("net_bench");
    fs::create_dir_all(crate::target_dir())?;
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .context("run cc (`cargo xtask setup` installs gcc)")?;
    if !status.success() {
        bail!("cc {} failed", source.display());
    }
    Ok(out)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

fn measure(cmd: &mut Command) -> Result<f64> {
    let out = cmd.output().context("run net_bench")?;
    if !out.status.success() {
        bail!("net_bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("net_bench printed {text:?}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|x, y| x.total_cmp(y));
    values[values.len() / 2]
}
