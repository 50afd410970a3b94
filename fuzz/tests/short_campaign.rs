//! The short fuzz campaign of the test suite: every target from its qemu-img-made seeds,
//! a fixed number of structure-aware mutants each, in the debug build (arithmetic
//! overflow panics). Any finding fails the test with the input saved under
//! `target/fuzz-findings/` for `instar-fuzz run TARGET FILE`.
//!
//! `INSTAR_FUZZ_EXECS` overrides the executions per target.

use std::path::PathBuf;
use std::time::Duration;

use instar_fuzz::campaign::{campaign, Budget, Finding};
use instar_fuzz::memory::CountingAlloc;
use instar_fuzz::seeds;
use instar_fuzz::targets::{signature, Target};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Executions per target: about 5 s each on one core in a debug build.
fn execs(target: Target) -> u64 {
    if let Some(n) = std::env::var("INSTAR_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    match target {
        Target::Qcow2Header | Target::Refcount | Target::Qcow2Repair => 20_000,
        Target::RebaseSafe | Target::RebaseUnsafe | Target::VmdkRead | Target::Chain => 4_000,
        // Mutants that keep the seed's small work factors run two PBKDF2 derivations.
        Target::LuksUnlock => 300,
        _ => 8_000,
    }
}

fn findings_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-findings")
}

fn run(target: Target) {
    let files = seeds::committed();
    let inputs = seeds::for_target(target, &files);
    assert!(!inputs.is_empty(), "no seeds for {}", target.name());
    let budget = Budget {
        execs: execs(target),
        time: Duration::from_secs(60),
    };
    let mut save = |f: &Finding| {
        let dir = findings_dir();
        let _ = std::fs::create_dir_all(&dir);
        let name = format!("{}-{:016x}", target.name(), signature(0, &f.what));
        let _ = std::fs::write(dir.join(name), &f.input);
    };
    // A fixed seed per target: the run is the same every time.
    let r = campaign(
        target,
        &inputs,
        budget,
        0x1057_a200 + target as u64,
        &mut save,
    );
    eprintln!(
        "{}: {} execs in {:.1} s, {} outcomes, slowest {:?}, peak {} KiB",
        target.name(),
        r.execs,
        r.elapsed.as_secs_f64(),
        r.outcomes,
        r.slowest,
        r.peak_memory >> 10
    );
    let whats: Vec<&str> = r.findings.iter().map(|f| f.what.as_str()).collect();
    assert!(
        whats.is_empty(),
        "{} findings (inputs in {}): {whats:#?}",
        whats.len(),
        findings_dir().display()
    );
    assert!(
        r.outcomes > 1,
        "{}: every mutant had the same outcome",
        target.name()
    );
}

#[test]
fn qcow2_header() {
    run(Target::Qcow2Header);
}

#[test]
fn qcow2_read() {
    run(Target::Qcow2Read);
}

#[test]
fn refcount() {
    run(Target::Refcount);
}

#[test]
fn compressed() {
    run(Target::Compressed);
}

#[test]
fn vmdk_descriptor() {
    run(Target::VmdkDescriptor);
}

#[test]
fn vmdk_read() {
    run(Target::VmdkRead);
}

#[test]
fn probe() {
    run(Target::Probe);
}

#[test]
fn chain() {
    run(Target::Chain);
}

#[test]
fn rebase_unsafe() {
    run(Target::RebaseUnsafe);
}

#[test]
fn rebase_safe() {
    run(Target::RebaseSafe);
}

#[test]
fn qed_read() {
    run(Target::QedRead);
}

#[test]
fn qcow2_repair() {
    run(Target::Qcow2Repair);
}

#[test]
fn qcow2_bitmaps() {
    run(Target::Qcow2Bitmaps);
}

#[test]
fn luks_unlock() {
    run(Target::LuksUnlock);
}
