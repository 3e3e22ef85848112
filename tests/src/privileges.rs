//! Tests that need root, cgroups or BPF skip on a developer laptop with a
//! clear message; CI sets [`REQUIRE_PRIVILEGED_ENV`], which turns every such
//! skip into a failure.

/// Set by `.ci/run`: a privileged test that cannot run fails instead of skipping.
pub const REQUIRE_PRIVILEGED_ENV: &str = "TOLLGATE_REQUIRE_PRIVILEGED";

/// True when the test may go on. Prints why when it may not; panics instead
/// when privileged tests are required.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cgroup2 = std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        || std::path::Path::new("/sys/fs/cgroup/cgroup.procs").exists();
    let missing = match (root, cgroup2) {
        (true, true) => return true,
        (false, _) => "root (cgroups, BPF and a PostgreSQL run as its own user)",
        (true, false) => "a cgroup v2 mount",
    };
    if std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_some() {
        panic!("{test} needs {missing}, and {REQUIRE_PRIVILEGED_ENV} forbids skipping it");
    }
    eprintln!(
        "SKIPPED {test}: needs {missing}; set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure"
    );
    false
}

/// A part of `test` this host cannot run (`why`: a kernel feature it
/// lacks, no IPv6): skipped with a message, or a failure where skips are
/// forbidden, as for a whole test.
pub fn skip_part(test: &str, why: &str) {
    if std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_some() {
        panic!("{test}: {why}, and {REQUIRE_PRIVILEGED_ENV} forbids skipping that part");
    }
    eprintln!(
        "SKIPPED part of {test}: {why}; set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure"
    );
}
