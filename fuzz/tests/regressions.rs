//! Inputs the campaigns found, replayed: each must now pass its target.

use std::path::Path;

use instar_fuzz::targets::Target;

fn replay(target: Target, name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Err(what) = target.run(&data) {
        panic!("{} on {name}: {what}", target.name());
    }
}

/// A dirty image whose L1 table is also a data cluster: QEMU's repair fixes the L1
/// entry's COPIED flag and so changes that cluster's data (instar's plan writes the
/// same bytes as `qemu-img check -r all`). The target's content invariant holds only
/// when no repair write lands on guest data; new structures and discards never may.
#[test]
fn qcow2_repair_l1_shared_with_data() {
    replay(Target::Qcow2Repair, "qcow2_repair-l1-shared-with-data");
}

/// A 40 KB vmdk descriptor file of 40,014 blank lines: the extent-line scan read across
/// the rest of the blank lines from every line start (42 s for one probe execution in a
/// debug build). It now shares one scan per run of blank lines; the replay runs with the
/// campaign's time budget.
#[test]
fn probe_descriptor_blank_lines() {
    let name = "open-probe-descriptor-blank-lines";
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for target in [Target::Probe, Target::VmdkDescriptor] {
        if let Err(what) = instar_fuzz::campaign::run_one(target, &data) {
            panic!("{} on {name}: {what}", target.name());
        }
    }
}

/// The LUKS seed unlocks with its passphrase (so the campaign's mutants start from a
/// header the whole unlock path accepts), and a wrong passphrase does not.
#[test]
fn luks_seed_unlocks() {
    use instar_fuzz::targets::signature;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/luks-header");
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(Target::LuksUnlock.run(&data), Ok(signature(3, "unlocked")));
    let mut wrong = data.clone();
    // The master-key digest no longer matches: every slot's unlock fails.
    wrong[112] ^= 1;
    assert_eq!(
        Target::LuksUnlock.run(&wrong),
        Ok(signature(4, "Invalid password, cannot unlock any keyslot"))
    );
}
