//! Builds the kernel programs (`gateway-ebpf`) and hands the object to the
//! daemon, which embeds it with `include_bytes!`. The kernel side needs the
//! `bpf-debian` toolchain and `bpf-linker` that `cargo xtask setup` installs
//! (docs/architecture.md explains why a separate toolchain).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir
        .parent()
        .expect("gateway/ sits in the workspace");
    let ebpf_dir = root.join("gateway-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));

    for watched in [
        "gateway-ebpf/src",
        "gateway-ebpf/Cargo.toml",
        "gateway-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_OBJECT");

    let object = out_dir.join("gateway-ebpf.o");
    // A prebuilt object can be supplied (e.g. for cross builds); the normal
    // path builds it from source here.
    if let Some(prebuilt) = env::var_os("TOLLGATE_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &object).expect("copy TOLLGATE_EBPF_OBJECT");
        return;
    }
    build_ebpf(&ebpf_dir, &out_dir.join("ebpf-target"), &object);
}

fn build_ebpf(ebpf_dir: &Path, target_dir: &Path, object: &Path) {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(ebpf_dir)
        .args(["run", "bpf-debian", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(target_dir);
    // Do not leak the outer build's settings into the kernel build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    // aya-ebpf uses unstable features; the Debian toolchain is stable.
    cmd.env("RUSTC_BOOTSTRAP", "1");
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().unwrap_or_else(|err| {
        panic!("cannot run rustup to build gateway-ebpf ({err}); run `cargo xtask setup` first")
    });
    if !status.success() {
        panic!(
            "building gateway-ebpf failed ({status}); `cargo xtask setup` installs the \
             bpf-debian toolchain and bpf-linker it needs"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/gateway-ebpf");
    std::fs::copy(&built, object)
        .unwrap_or_else(|err| panic!("copy {} -> {}: {err}", built.display(), object.display()));
}
