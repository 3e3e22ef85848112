//! `cargo xtask bench-pinning`: what the kernel programs cost.
//!
//! - the pinning programs (connect4/6, getpeername4/6, sendmsg4/6,
//!   sock_create, sock_ops on the agent cgroup): nanoseconds added to one
//!   connect() from an agent cgroup to a loopback destination that is not
//!   protected, the price every agent connection pays;
//! - the host-wide evidence programs (tp_btf inet_sock_set_state,
//!   cgroup_skb egress at the cgroup root): the share of a loopback TCP
//!   transfer's CPU time they take.
//!
//! Primary figures come from the kernel's own accounting of BPF run time
//! (`kernel.bpf_stats_enabled`, switched on with BPF_ENABLE_STATS for that
//! phase only): run_cnt and run_time_ns of each program, read with bpftool
//! before and after a workload. A wall-clock A/B (with the programs against
//! without, alternating, many short rounds) is kept as a sanity check: on a
//! shared VM its noise is microseconds and tens of percent, far above what
//! the programs cost, so it can only show it is consistent with them.
//!
//! The measuring program is C (xtask/c/net_bench.c), built here with cc,
//! so interpreter overhead does not drown microseconds.

use std::{
    collections::HashMap,
    fs,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tollgate_tests::{AgentCgroup, Stack};

use crate::step;

/// Kernel accounting phase: enough connects and bytes that the program run
/// times are summed over hundreds of thousands of runs.
const PRECISE_CONNECT_ROUNDS: usize = 5;
const PRECISE_CONNECTS: u64 = 20_000;
const PRECISE_STREAMS: usize = 3;
const PRECISE_STREAM_BYTES: u64 = 2_000_000_000;

/// Wall-clock A/B: short rounds, many of them, so a slow minute of the host
/// spoils a few pairs instead of the medians.
const AB_CONNECT_PAIRS: usize = 40;
const AB_CONNECTS: u64 = 2_000;
const AB_STREAM_PAIRS: usize = 10;
const AB_STREAM_BYTES: u64 = 500_000_000;

/// Issue #6's targets.
const CONNECT_TARGET_NS: f64 = 2_000.0;
const THROUGHPUT_TARGET_PERCENT: f64 = 3.0;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub fn run(binary: &Path) -> Result<()> {
    std::env::set_var("TOLLGATE_BIN", binary);
    let bench = build_net_bench()?;
    step("starting PostgreSQL, the development IdP and tollgate (pins an agent cgroup, attaches the evidence programs)");
    let mut stack = Stack::start()?;
    let agent_cgroup = stack.gateway.config.agent_cgroup.clone();
    let plain = AgentCgroup::root().join(format!("tollgate-bench-plain-{}", std::process::id()));
    fs::create_dir_all(&plain).with_context(|| format!("create {}", plain.display()))?;
    let result = measure_all(&mut stack, binary, &bench, &agent_cgroup, &plain);
    // net_bench has exited, so the cgroup is empty and can go.
    let _ = fs::remove_dir(&plain);
    let report = result?;
    println!("{report}");
    Ok(())
}

fn measure_all(
    stack: &mut Stack,
    binary: &Path,
    bench: &Path,
    agent_cgroup: &Path,
    plain: &Path,
) -> Result<String> {
    let programs = attached_programs(binary, &stack.gateway.config_path, agent_cgroup)?;
    let precise = measure_precise(bench, agent_cgroup, &programs)?;
    let ab = measure_wall_clock(stack, bench, agent_cgroup, plain)?;
    Ok(render(&precise, &ab))
}

// ---------------------------------------------------------------------------
// Kernel accounting

/// One of tollgate's programs as `tollgate pin status` names it.
struct Program {
    name: String,
    id: u64,
    /// Attached to the agent cgroup (pinning); otherwise host-wide (evidence).
    pinning: bool,
}

/// Program ids come from the pinned links of this stack's own gateway, so
/// another tollgate loaded on the same host is not counted.
fn attached_programs(binary: &Path, config: &Path, agent_cgroup: &Path) -> Result<Vec<Program>> {
    let out = Command::new(binary)
        .args(["pin", "status", "--json", "--config"])
        .arg(config)
        .output()
        .context("run `tollgate pin status`")?;
    if !out.status.success() {
        bail!(
            "tollgate pin status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agent_id = fs::metadata(agent_cgroup)
        .with_context(|| format!("stat {}", agent_cgroup.display()))?
        .ino()
        .to_string();
    let listing: Value =
        serde_json::from_slice(&out.stdout).context("parse `tollgate pin status --json`")?;
    let entries = listing
        .as_array()
        .context("`tollgate pin status --json` is not a list")?;
    let mut programs = Vec::new();
    for entry in entries {
        let field = |key: &str| {
            entry
                .get(key)
                .with_context(|| format!("`tollgate pin status --json`: entry without {key}"))
        };
        let name = field("program")?
            .as_str()
            .context("program is not a string")?
            .to_owned();
        let attached_to = field("attached_to")?
            .as_str()
            .context("attached_to is not a string")?;
        let id = field("program_id")?
            .as_u64()
            .context("program_id is not a number")?;
        programs.push(Program {
            pinning: attached_to == agent_id,
            name,
            id,
        });
    }
    if !programs.iter().any(|p| p.pinning) || !programs.iter().any(|p| !p.pinning) {
        bail!("expected pinning and evidence programs pinned, `tollgate pin status` listed {entries:?}");
    }
    programs.sort_by(|a, b| (!a.pinning, &a.name).cmp(&(!b.pinning, &b.name)));
    Ok(programs)
}

/// BPF run-time statistics, on while this value lives. The kernel counts
/// the holders of BPF_ENABLE_STATS fds, so closing ours (also when xtask
/// dies) returns `kernel.bpf_stats_enabled` to what it was, and a sysctl
/// setting made by someone else is left alone.
struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    fn enable() -> Result<Self> {
        // linux/bpf.h: BPF_ENABLE_STATS command, BPF_STATS_RUN_TIME type;
        // union bpf_attr's enable_stats member is one u32.
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        let attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: the kernel reads size_of::<u32>() bytes from &attr, which
        // lives across the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                std::mem::size_of::<u32>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("bpf(BPF_ENABLE_STATS) (Linux 5.8 or later, CAP_SYS_ADMIN)");
        }
        let fd = i32::try_from(fd).context("bpf(BPF_ENABLE_STATS) returned no fd")?;
        // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
        Ok(Self {
            _fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

fn stats_sysctl() -> Result<String> {
    Ok(fs::read_to_string(STATS_SYSCTL)
        .with_context(|| format!("read {STATS_SYSCTL}"))?
        .trim()
        .to_owned())
}

#[derive(Clone, Copy, Default)]
struct RunStats {
    runs: u64,
    ns: u64,
}

/// run_cnt and run_time_ns of each program in `programs`, by id.
fn run_stats(programs: &[Program]) -> Result<HashMap<u64, RunStats>> {
    let out = Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .context("run bpftool (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listing: Value =
        serde_json::from_slice(&out.stdout).context("parse `bpftool --json prog show`")?;
    let loaded = listing
        .as_array()
        .context("`bpftool --json prog show` is not a list")?;
    let mut stats = HashMap::new();
    for program in programs {
        let entry = loaded
            .iter()
            .find(|p| p.get("id").and_then(Value::as_u64) == Some(program.id))
            .with_context(|| {
                format!("program {} (id {}) is not loaded", program.name, program.id)
            })?;
        // bpftool leaves both fields out while they are zero.
        let number = |key: &str| entry.get(key).and_then(Value::as_u64).unwrap_or(0);
        stats.insert(
            program.id,
            RunStats {
                runs: number("run_cnt"),
                ns: number("run_time_ns"),
            },
        );
    }
    Ok(stats)
}

fn stats_delta(
    programs: &[Program],
    before: &HashMap<u64, RunStats>,
    after: &HashMap<u64, RunStats>,
) -> Result<HashMap<u64, RunStats>> {
    let mut delta = HashMap::new();
    for program in programs {
        let (Some(b), Some(a)) = (before.get(&program.id), after.get(&program.id)) else {
            bail!("no run statistics for {}", program.name);
        };
        let (Some(runs), Some(ns)) = (a.runs.checked_sub(b.runs), a.ns.checked_sub(b.ns)) else {
            bail!("run statistics of {} went backwards", program.name);
        };
        delta.insert(program.id, RunStats { runs, ns });
    }
    Ok(delta)
}

struct ProgramCost {
    name: String,
    pinning: bool,
    delta: RunStats,
}

struct Precise {
    stats_before: String,
    stats_after: String,
    connects: u64,
    /// Every program, over the connect phase.
    connect: Vec<ProgramCost>,
    stream_bytes: u64,
    stream_cpu_ns: f64,
    stream_mb_s: Vec<f64>,
    /// Every program, over the stream phase.
    stream: Vec<ProgramCost>,
}

fn costs(programs: &[Program], delta: &HashMap<u64, RunStats>) -> Vec<ProgramCost> {
    programs
        .iter()
        .map(|p| ProgramCost {
            name: p.name.clone(),
            pinning: p.pinning,
            delta: delta.get(&p.id).copied().unwrap_or_default(),
        })
        .collect()
}

fn measure_precise(bench: &Path, agent_cgroup: &Path, programs: &[Program]) -> Result<Precise> {
    let stats_before = stats_sysctl()?;
    step(&format!(
        "BPF run-time accounting on for the next two measurements (BPF_ENABLE_STATS; {STATS_SYSCTL} was {stats_before})"
    ));
    let guard = RunTimeStats::enable()?;

    step(&format!(
        "kernel accounting, connect(): {PRECISE_CONNECT_ROUNDS} x {PRECISE_CONNECTS} connects from the agent cgroup"
    ));
    let before = run_stats(programs)?;
    for round in 1..=PRECISE_CONNECT_ROUNDS {
        let (median, _) = connect(bench, PRECISE_CONNECTS, agent_cgroup)?;
        eprintln!("    round {round}/{PRECISE_CONNECT_ROUNDS}: median connect() {median:.0} ns");
    }
    let after = run_stats(programs)?;
    let connect = costs(programs, &stats_delta(programs, &before, &after)?);

    step(&format!(
        "kernel accounting, throughput: {PRECISE_STREAMS} loopback streams of {PRECISE_STREAM_BYTES} bytes"
    ));
    let before = run_stats(programs)?;
    let mut stream_cpu_ns = 0.0;
    let mut stream_mb_s = Vec::new();
    for round in 1..=PRECISE_STREAMS {
        let (mb_s, cpu_ns) = stream(bench, PRECISE_STREAM_BYTES)?;
        eprintln!(
            "    stream {round}/{PRECISE_STREAMS}: {mb_s:.0} MB/s, {:.0} ms CPU",
            cpu_ns / 1e6
        );
        stream_cpu_ns += cpu_ns;
        stream_mb_s.push(mb_s);
    }
    let after = run_stats(programs)?;
    let stream = costs(programs, &stats_delta(programs, &before, &after)?);

    drop(guard);
    let stats_after = stats_sysctl()?;
    step(&format!(
        "BPF run-time accounting released ({STATS_SYSCTL} is {stats_after})"
    ));
    if stats_after != stats_before {
        bail!(
            "{STATS_SYSCTL} was {stats_before} before the benchmark and is {stats_after} after it"
        );
    }
    Ok(Precise {
        stats_before,
        stats_after,
        connects: PRECISE_CONNECT_ROUNDS as u64 * PRECISE_CONNECTS,
        connect,
        stream_bytes: PRECISE_STREAMS as u64 * PRECISE_STREAM_BYTES,
        stream_cpu_ns,
        stream_mb_s,
        stream,
    })
}

// ---------------------------------------------------------------------------
// Wall-clock A/B

struct WallClock {
    connect_agent: Vec<f64>,
    connect_plain: Vec<f64>,
    /// agent - plain, ns, per pair.
    connect_diff: Vec<f64>,
    stream_with: Vec<f64>,
    stream_without: Vec<f64>,
    /// (with - without) / without, percent, per pair.
    stream_diff: Vec<f64>,
    /// CPU time of writer and reader per GB, ms, and its per-pair
    /// difference in percent: steal and run-queue waits, most of the
    /// wall-clock noise, do not count in it.
    cpu_with: Vec<f64>,
    cpu_without: Vec<f64>,
    cpu_diff: Vec<f64>,
}

fn measure_wall_clock(
    stack: &mut Stack,
    bench: &Path,
    agent_cgroup: &Path,
    plain: &Path,
) -> Result<WallClock> {
    step(&format!(
        "wall-clock A/B, connect(): {AB_CONNECT_PAIRS} pairs of {AB_CONNECTS} connects, agent cgroup vs a plain one, order swapped every pair"
    ));
    let mut ab = WallClock {
        connect_agent: Vec::new(),
        connect_plain: Vec::new(),
        connect_diff: Vec::new(),
        stream_with: Vec::new(),
        stream_without: Vec::new(),
        stream_diff: Vec::new(),
        cpu_with: Vec::new(),
        cpu_without: Vec::new(),
        cpu_diff: Vec::new(),
    };
    for pair in 0..AB_CONNECT_PAIRS {
        // Swapping the order cancels whatever the first run of a pair
        // pays (or gains) for going first.
        let (agent, plain) = if pair % 2 == 0 {
            let a = connect(bench, AB_CONNECTS, agent_cgroup)?.0;
            (a, connect(bench, AB_CONNECTS, plain)?.0)
        } else {
            let p = connect(bench, AB_CONNECTS, plain)?.0;
            (connect(bench, AB_CONNECTS, agent_cgroup)?.0, p)
        };
        eprintln!(
            "    pair {}/{AB_CONNECT_PAIRS}: agent {agent:.0} ns, plain {plain:.0} ns",
            pair + 1
        );
        ab.connect_agent.push(agent);
        ab.connect_plain.push(plain);
        ab.connect_diff.push(agent - plain);
    }

    step(&format!(
        "wall-clock A/B, throughput: {AB_STREAM_PAIRS} pairs of {AB_STREAM_BYTES}-byte streams with the evidence programs and without (tollgate stopped and unpinned), order swapped every pair"
    ));
    // with, unpin, without | without, restart, with | with, unpin, ...:
    // one attach or detach per pair, and the two streams of a pair are
    // back to back.
    let mut attached = true;
    for pair in 0..AB_STREAM_PAIRS {
        let mut with = None;
        let mut without = None;
        for _ in 0..2 {
            if attached {
                with = Some(stream(bench, AB_STREAM_BYTES)?);
                if without.is_none() {
                    stack.gateway.stop();
                    stack.gateway.unpin()?;
                    attached = false;
                }
            } else {
                without = Some(stream(bench, AB_STREAM_BYTES)?);
                if with.is_none() {
                    stack.gateway.restart()?;
                    attached = true;
                }
            }
        }
        let (Some((with, with_cpu)), Some((without, without_cpu))) = (with, without) else {
            bail!("stream pair {} missed a side", pair + 1);
        };
        let gb = AB_STREAM_BYTES as f64 / 1e9;
        let (with_cpu, without_cpu) = (with_cpu / 1e6 / gb, without_cpu / 1e6 / gb);
        eprintln!(
            "    pair {}/{AB_STREAM_PAIRS}: with {with:.0} MB/s ({with_cpu:.0} ms CPU per GB), without {without:.0} MB/s ({without_cpu:.0} ms CPU per GB)",
            pair + 1
        );
        ab.cpu_with.push(with_cpu);
        ab.cpu_without.push(without_cpu);
        ab.cpu_diff
            .push((with_cpu - without_cpu) / without_cpu * 100.0);
        ab.stream_with.push(with);
        ab.stream_without.push(without);
        ab.stream_diff.push((with - without) / without * 100.0);
    }
    Ok(ab)
}

// ---------------------------------------------------------------------------
// Report

fn render(p: &Precise, ab: &WallClock) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let per_connect = |c: &ProgramCost| c.delta.ns as f64 / p.connects as f64;
    let connect_pinning: f64 = p
        .connect
        .iter()
        .filter(|c| c.pinning)
        .map(per_connect)
        .sum();
    let connect_evidence: f64 = p
        .connect
        .iter()
        .filter(|c| !c.pinning)
        .map(per_connect)
        .sum();
    let stream_evidence_ns: u64 = p
        .stream
        .iter()
        .filter(|c| !c.pinning)
        .map(|c| c.delta.ns)
        .sum();
    let evidence_share = stream_evidence_ns as f64 / p.stream_cpu_ns * 100.0;

    line(String::new());
    line(format!(
        "Kernel accounting (BPF_ENABLE_STATS; {STATS_SYSCTL} {} before, {} after): {} connects from the agent cgroup",
        p.stats_before, p.stats_after, p.connects
    ));
    line(String::new());
    line("| program | attached to | runs per connect | ns per run | ns per connect |".into());
    line("| --- | --- | --- | --- | --- |".into());
    for c in &p.connect {
        line(format!(
            "| {} | {} | {:.2} | {} | {:.0} |",
            c.name,
            if c.pinning {
                "agent cgroup"
            } else {
                "host (evidence)"
            },
            c.delta.runs as f64 / p.connects as f64,
            ns_per_run(c.delta),
            per_connect(c)
        ));
    }
    line(format!(
        "| **pinning programs, total** | agent cgroup | | | **{connect_pinning:.0}** |"
    ));
    line(format!(
        "| evidence programs, total (every connection on the host, both ends, close included) | host | | | {connect_evidence:.0} |"
    ));
    line(String::new());
    let mb_s = median(&p.stream_mb_s);
    line(format!(
        "Kernel accounting over {} loopback streams, {} bytes in all, {:.0} ms CPU (writer + reader, user + system), median {mb_s:.0} MB/s",
        p.stream_mb_s.len(),
        p.stream_bytes,
        p.stream_cpu_ns / 1e6
    ));
    line(String::new());
    line("| program | runs | ns per run | run time | share of the transfer's CPU time |".into());
    line("| --- | --- | --- | --- | --- |".into());
    for c in p.stream.iter().filter(|c| !c.pinning) {
        line(format!(
            "| {} | {} | {} | {:.2} ms | {:.3}% |",
            c.name,
            c.delta.runs,
            ns_per_run(c.delta),
            c.delta.ns as f64 / 1e6,
            c.delta.ns as f64 / p.stream_cpu_ns * 100.0
        ));
    }
    line(format!(
        "| **evidence programs, total** | | | {:.2} ms | **{evidence_share:.3}%** |",
        stream_evidence_ns as f64 / 1e6
    ));
    line(String::new());
    line("| target (issue #6) | measured | met |".into());
    line("| --- | --- | --- |".into());
    line(format!(
        "| under 2 us added per connect() from an agent cgroup | {connect_pinning:.0} ns of pinning-program run time | {} |",
        yes_no(connect_pinning < CONNECT_TARGET_NS)
    ));
    line(format!(
        "| under 3% loopback throughput loss | evidence programs take {evidence_share:.3}% of the transfer's CPU time | {} |",
        yes_no(evidence_share < THROUGHPUT_TARGET_PERCENT)
    ));
    line(String::new());
    line("Wall-clock A/B (no run-time accounting), alternating:".into());
    line(String::new());
    line("| measurement | with tollgate's programs (median) | without (median) | median of per-pair differences | interquartile range of the differences |".into());
    line("| --- | --- | --- | --- | --- |".into());
    line(format!(
        "| connect(), median ns per call, {AB_CONNECT_PAIRS} pairs x {AB_CONNECTS} | {:.0} ns | {:.0} ns | {:+.0} ns | {:+.0} .. {:+.0} ns |",
        median(&ab.connect_agent),
        median(&ab.connect_plain),
        median(&ab.connect_diff),
        quantile(&ab.connect_diff, 0.25),
        quantile(&ab.connect_diff, 0.75)
    ));
    line(format!(
        "| loopback TCP throughput, {AB_STREAM_PAIRS} pairs x {AB_STREAM_BYTES} B | {:.0} MB/s | {:.0} MB/s | {:+.1}% | {:+.1}% .. {:+.1}% |",
        median(&ab.stream_with),
        median(&ab.stream_without),
        median(&ab.stream_diff),
        quantile(&ab.stream_diff, 0.25),
        quantile(&ab.stream_diff, 0.75)
    ));
    line(format!(
        "| CPU time of the transfer (writer + reader), same pairs | {:.0} ms/GB | {:.0} ms/GB | {:+.1}% | {:+.1}% .. {:+.1}% |",
        median(&ab.cpu_with),
        median(&ab.cpu_without),
        median(&ab.cpu_diff),
        quantile(&ab.cpu_diff, 0.25),
        quantile(&ab.cpu_diff, 0.75)
    ));
    line(String::new());
    line(format!(
        "all pairs: connect agent {:?} plain {:?}; stream MB/s with {:?} without {:?}; CPU ms/GB with {:?} without {:?}",
        rounded(&ab.connect_agent),
        rounded(&ab.connect_plain),
        rounded(&ab.stream_with),
        rounded(&ab.stream_without),
        rounded(&ab.cpu_with),
        rounded(&ab.cpu_without)
    ));
    out
}

fn ns_per_run(stats: RunStats) -> String {
    if stats.runs == 0 {
        "-".into()
    } else {
        format!("{:.0}", stats.ns as f64 / stats.runs as f64)
    }
}

fn yes_no(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "no"
    }
}

fn rounded(values: &[f64]) -> Vec<i64> {
    values.iter().map(|v| v.round() as i64).collect()
}

pub(crate) fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

/// Linear interpolation between the closest ranks; NaN for no values.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|x, y| x.total_cmp(y));
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

// ---------------------------------------------------------------------------
// net_bench

fn build_net_bench() -> Result<PathBuf> {
    let source = crate::root().join("xtask/c/net_bench.c");
    let out = crate::target_dir().join("net_bench");
    fs::create_dir_all(crate::target_dir())?;
    let status = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .context("run cc (`cargo xtask setup` installs gcc)")?;
    if !status.success() {
        bail!("cc {} failed", source.display());
    }
    Ok(out)
}

/// `connects` connect() calls from `cgroup`: (median, mean) ns per call.
fn connect(bench: &Path, connects: u64, cgroup: &Path) -> Result<(f64, f64)> {
    let fields = net_bench(
        Command::new(bench)
            .arg("connect")
            .arg(connects.to_string())
            .arg(cgroup),
    )?;
    Ok((fields[0], fields[1]))
}

/// One loopback stream of `bytes`: (MB/s, CPU ns of writer and reader).
fn stream(bench: &Path, bytes: u64) -> Result<(f64, f64)> {
    let fields = net_bench(Command::new(bench).arg("stream").arg(bytes.to_string()))?;
    Ok((fields[0], fields[1]))
}

/// Runs net_bench and parses the two numbers it prints.
fn net_bench(cmd: &mut Command) -> Result<[f64; 2]> {
    let out = cmd.output().context("run net_bench")?;
    if !out.status.success() {
        bail!("net_bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<f64>, _>>()
        .with_context(|| format!("net_bench printed {text:?}"))?;
    match numbers[..] {
        [a, b] => Ok([a, b]),
        _ => bail!("net_bench printed {text:?}, expected two numbers"),
    }
}
