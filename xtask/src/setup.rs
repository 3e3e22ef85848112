//! Idempotent host setup: Debian packages, the toolchain for the kernel
//! programs, and the Python packages the tests use. Every step checks
//! first and does nothing when already done.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Result};

use crate::{run_checked, step};

/// Debian packages: kernel-side toolchain, servers and clients for tests.
const DEBIAN_PACKAGES: &[&str] = &[
    // Rust eBPF: Debian's rustc ships core for bpfel-unknown-none, and
    // bpf-linker builds against its LLVM.
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    // Real servers and clients for the tests and the demo.
    "postgresql",
    "postgresql-contrib",
    "postgresql-client",
    "pgbouncer",
    "openssh-server",
    "sshpass",
    "libpostgresql-jdbc-java",
    "iproute2",
    // The io_uring test compiles a small C program making raw io_uring
    // system calls against the kernel's UAPI headers (no liburing).
    "gcc",
    "libc6-dev",
    "linux-libc-dev",
    // jemalloc, tollgate's allocator, is built from C by its crate's
    // build script (configure and make).
    "make",
];

const PYTHON_PACKAGES: &[&str] = &["duckdb==1.*", "psycopg[binary]==3.*"];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("setup installs system packages and must run as root");
    }
    debian_packages()?;
    bpf_toolchain()?;
    python_packages()?;
    step("setup complete");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc
    // dependency for one call.
    extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    step(&format!(
        "Debian packages: installing {}",
        missing.join(" ")
    ));
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_toolchain() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()?;
    if String::from_utf8_lossy(&toolchains.stdout).contains("bpf-debian") {
        step("bpf-debian toolchain: linked");
    } else {
        step("bpf-debian toolchain: linking Debian's rustc (it ships core for bpfel-unknown-none)");
        run_checked(Command::new("rustup").args(["toolchain", "link", "bpf-debian", "/usr"]))?;
    }

    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if have_linker {
        step("bpf-linker: present");
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (a few minutes, once)"
    ));
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_checked(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
}

/// The Python the tests use: a virtualenv kept outside the clone.
pub fn python() -> PathBuf {
    PathBuf::from("/var/cache/tollgate/venv/bin/python")
}

fn python_packages() -> Result<()> {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import duckdb, psycopg"])
        .output();
    if probe.map(|out| out.status.success()).unwrap_or(false) {
        step("Python packages: present");
        return Ok(());
    }
    step(&format!(
        "Python packages: installing {} into a virtualenv",
        PYTHON_PACKAGES.join(" ")
    ));
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tollgate/venv"));
    run_checked(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )
}
