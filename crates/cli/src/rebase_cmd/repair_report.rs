//! Printing what the guest's repair of a dirty overlay found, with QEMU's wording
//! (QEMU prints these lines to stderr while it opens the overlay).
//!
//! The guest sends numbers only; the host words every line. A run cannot claim more
//! clusters than a file of the overlay's size can hold, so a guest taken over by a
//! crafted image cannot make the host print without end.

use std::io::Write;

use instar_abi::{RepairLines, RepairVerdict};

/// Every line of `runs`, for an overlay file of `overlay_len` bytes.
pub fn lines(runs: &[RepairLines], overlay_len: u64) -> Vec<String> {
    // Clusters are at least 512 bytes; the repair may add a refcount structure.
    let max_count = overlay_len / 512 + 4096;
    let mut out = Vec::new();
    for run in runs {
        match *run {
            RepairLines::Clusters {
                verdict,
                first,
                count,
                refcount,
                reference,
            } => {
                let word = match verdict {
                    RepairVerdict::Repairing => "Repairing",
                    RepairVerdict::Error => "ERROR",
                    RepairVerdict::Leaked => "Leaked",
                };
                for i in first..first.saturating_add(count.min(max_count)) {
                    out.push(format!(
                        "{word} cluster {i} refcount={refcount} reference={reference}"
                    ));
                }
            }
            RepairLines::BlockRefcount { index, refcount } => {
                out.push(format!("ERROR refcount block {index} refcount={refcount}"));
            }
            RepairLines::Rebuilding => out.push(String::from("Rebuilding refcount structure")),
            RepairLines::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
            } => out.push(format!(
                "Repairing OFLAG_COPIED L2 cluster: l1_index={l1_index} \
                 l1_entry={l1_entry:x} refcount={refcount}"
            )),
            RepairLines::CopiedData { l2_entry, refcount } => out.push(format!(
                "Repairing OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}"
            )),
            RepairLines::StaleBitmaps { v2 } => {
                out.push(format!("instar: warning: {}", stale_bitmaps_warning(v2)));
                out.push(String::from(STALE_BITMAPS_HINT));
            }
        }
    }
    out
}

/// QEMU's `warn_report` when a bitmaps extension lacks the autoclear bit.
fn stale_bitmaps_warning(v2: bool) -> &'static str {
    if v2 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program \
         without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent"
    }
}

/// QEMU's `error_printf` after that warning; it prints no newline after it.
const STALE_BITMAPS_HINT: &str =
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";

/// Print the lines of `runs` to stderr.
pub fn print(runs: &[RepairLines], overlay_len: u64) {
    if runs.is_empty() {
        return;
    }
    let mut text = String::new();
    for line in lines(runs, overlay_len) {
        text.push_str(&line);
        text.push('\n');
    }
    // QEMU ends the stale-bitmaps hint without a newline.
    if matches!(runs.last(), Some(RepairLines::StaleBitmaps { .. })) {
        text.pop();
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_bitmaps_warning_in_both_wordings() {
        let v3 = lines(&[RepairLines::StaleBitmaps { v2: false }], 0);
        assert_eq!(
            v3,
            [
                "instar: warning: a program lacking bitmap support modified this file, so all \
                 bitmaps are now considered inconsistent",
                "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            ]
        );
        let v2 = lines(&[RepairLines::StaleBitmaps { v2: true }], 0);
        assert!(v2[0].starts_with("instar: warning: This qcow2 v2 image contains bitmaps, but"));
        assert!(v2[0].ends_with("so now they must all be considered inconsistent"));
    }

    #[test]
    fn runs_expand_with_qemus_wording_and_a_bound() {
        let runs = [
            RepairLines::Clusters {
                verdict: RepairVerdict::Error,
                first: 5,
                count: 2,
                refcount: 0,
                reference: 1,
            },
            RepairLines::Rebuilding,
            RepairLines::CopiedData {
                l2_entry: 0x8000_0000_0005_0000,
                refcount: 2,
            },
            RepairLines::BlockRefcount {
                index: 0,
                refcount: 2,
            },
            RepairLines::Clusters {
                verdict: RepairVerdict::Repairing,
                first: 3,
                count: u64::MAX,
                refcount: 1,
                reference: 0,
            },
        ];
        let l = lines(&runs, 0);
        assert_eq!(l[0], "ERROR cluster 5 refcount=0 reference=1");
        assert_eq!(l[1], "ERROR cluster 6 refcount=0 reference=1");
        assert_eq!(l[2], "Rebuilding refcount structure");
        assert_eq!(
            l[3],
            "Repairing OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2"
        );
        assert_eq!(l[4], "ERROR refcount block 0 refcount=2");
        assert_eq!(l[5], "Repairing cluster 3 refcount=1 reference=0");
        assert_eq!(l.len(), 5 + 4096);
    }
}
