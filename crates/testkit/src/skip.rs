//! The skip rules: a test that needs KVM or a reference qemu-img prints a note and passes
//! when it is missing, unless `INSTAR_REQUIRE_KVM=1` / `INSTAR_REQUIRE_QEMU=1` makes the
//! missing part a failure (CI sets both, so nothing is skipped there by accident).

use std::fs::OpenOptions;

/// Whether the environment variable `var` is `1`.
pub fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// Skip (`false`, after a note) or fail (under `var=1`) when `ok` is false.
pub fn need(ok: bool, var: &str, what: &str) -> bool {
    if !ok {
        assert!(!required(var), "{what} and {var}=1");
        eprintln!("note: skipping: {what}");
    }
    ok
}

/// Whether `/dev/kvm` can be opened read-write, so the sandbox can run here; otherwise
/// skip the test with a note, or fail it under `INSTAR_REQUIRE_KVM=1`.
pub fn require_kvm() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => need(
            false,
            "INSTAR_REQUIRE_KVM",
            &format!("/dev/kvm cannot be opened ({e})"),
        ),
    }
}
