//! A slice of the end-to-end campaign (scripts/fuzz_e2e.py) in the test suite: 100
//! mutated overlays and chains (qcow2, vmdk and qed) through the real instar binary and
//! its sandbox, from the committed seeds. Needs /dev/kvm, qemu-img and the instar binary next to this
//! package's binary (as `cargo test --workspace` builds it); skips without them unless
//! INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

use std::path::{Path, PathBuf};
use std::process::Command;

fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

fn skip_or_fail(var: &str, why: &str) {
    assert!(!required(var), "{why} ({var}=1)");
    eprintln!("skipping: {why}");
}

#[test]
fn hundred_cases_through_the_binary() {
    let mutator = PathBuf::from(env!("CARGO_BIN_EXE_instar-fuzz"));
    let instar = mutator.with_file_name("instar");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !Path::new("/dev/kvm").exists() {
        return skip_or_fail("INSTAR_REQUIRE_KVM", "no /dev/kvm");
    }
    if !instar.is_file() {
        return skip_or_fail(
            "INSTAR_REQUIRE_KVM",
            &format!("no instar binary at {}", instar.display()),
        );
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        return skip_or_fail("INSTAR_REQUIRE_QEMU", "no qemu-img");
    }
    let out = std::env::temp_dir().join(format!("instar-fuzz-e2e-{}", std::process::id()));
    let r = Command::new("python3")
        .arg(root.join("scripts/fuzz_e2e.py"))
        .args(["--cases", "100", "--seed", "6"])
        .arg("--out")
        .arg(&out)
        .arg("--instar")
        .arg(&instar)
        .arg("--mutator")
        .arg(&mutator)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&r.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        r.status.success(),
        "end-to-end findings (inputs in {})",
        out.display()
    );
    assert!(text.contains("e2e: 100 cases"), "{text}");
    // qed overlays, some rebased to the end, and qed images in the chains.
    assert!(count_before(&text, " qed (") > 0, "{text}");
    assert!(
        count_before(&text, " exit 0); ") > 0,
        "no qed overlay rebased: {text}"
    );
    assert!(count_before(&text, " with a qed backing") > 0, "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The number written right before `marker` in the campaign's summary line (0 if none).
fn count_before(text: &str, marker: &str) -> u64 {
    let Some(at) = text.find(marker) else {
        return 0;
    };
    let head = &text[..at];
    let start = head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    head[start..].parse().unwrap_or(0)
}
