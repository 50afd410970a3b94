//! Builds the sandbox guest (`guest/`, its own cargo workspace with bare-metal flags)
//! and leaves it in `$OUT_DIR/rebase.bin` for `include_bytes!`, so `instar` is one file.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The no_std crates the guest is built from (besides guest/ itself).
const GUEST_CRATES: &[&str] = &["abi", "blockdev", "qcow2", "vmdk", "qed", "chain", "rebase"];

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/cli lives two levels below the repository root")
        .to_path_buf();
    let guest = root.join("guest");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    // Not the whole guest/ directory: its target/ changes on every build.
    for p in [
        "src",
        "csrc",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    for c in GUEST_CRATES {
        let dir = root.join("crates").join(c);
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!("cargo:rerun-if-changed=build.rs");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = guest.join("target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    // The outer build's settings must not leak into the guest build: its rustflags,
    // target, profile overrides, and clippy's wrapper. The guest's own
    // .cargo/config.toml decides. The jobserver (CARGO_MAKEFLAGS) and CARGO_HOME stay.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if leaks {
            cmd.env_remove(key);
        }
    }
    let output = cmd.output().expect("cannot run cargo to build the guest");
    if !output.status.success() {
        panic!(
            "building the guest failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/rebase");
    std::fs::copy(&elf, out_dir.join("rebase.bin"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", elf.display()));
}
