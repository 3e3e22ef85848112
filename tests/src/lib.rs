//! The harness of tollgate's end-to-end tests (and of `cargo xtask demo`):
//! real servers and clients, started per test on free ports, so a test
//! depends on nothing left running on the machine.
//!
//! - [`Postgres`]: a PostgreSQL 15 instance made with initdb in a temporary
//!   directory, SCRAM authentication, connection logging on;
//! - [`DevIdp`]: tollgate's development identity provider;
//! - [`Gateway`]: the tollgate daemon with a given configuration;
//! - [`AgentCgroup`]: a cgroup v2 whose processes are agents;
//! - [`duckdb`]: queries over the audit Parquet with the Python duckdb package;
//! - [`evidence`]: the kernel evidence stream and `tollgate verify`.

pub mod duckdb;
pub mod evidence;
mod gateway;
pub mod idp;
pub mod pki;
pub mod postgres;
mod privileges;
mod session;
mod stack;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

pub use gateway::{AgentCgroup, Gateway, GatewayConfig, DEFAULT_POLICY};
pub use idp::DevIdp;
pub use postgres::Postgres;
pub use privileges::{privileged, skip_part, REQUIRE_PRIVILEGED_ENV};
pub use session::AgentSession;
pub use stack::Stack;

/// The tollgate binary under test: `TOLLGATE_BIN` (set by `cargo xtask
/// test`), or the one next to this test binary in the target directory.
pub fn tollgate_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> -> target/debug/tollgate
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("tollgate"))
        .expect("target directory layout")
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Waits until `check` holds, or fails after `timeout` saying what it waited for.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Compiles the test program `tests/c/<name>.c` with `cc -O<opt>` into
/// `dir`; the binary's path.
pub fn compile_c_program(name: &str, opt: u8, dir: &std::path::Path) -> String {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("c")
        .join(format!("{name}.c"));
    let binary = dir.join(name);
    let out = std::process::Command::new("cc")
        .arg(format!("-O{opt}"))
        .args(["-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("run cc (the tests need a C compiler)");
    assert!(
        out.status.success(),
        "cc {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    binary.display().to_string()
}

pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
