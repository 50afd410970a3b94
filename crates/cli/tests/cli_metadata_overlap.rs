//! Overlays whose metadata lies about where writes may go: made with qemu-img, then
//! byte-patched (an L1 entry naming a refcount block, two L1 entries naming one L2 table,
//! a refcount of 0 on a cluster in use, …). Each goes through the real binary in safe
//! mode (onto another backing) and as a flatten (`-b ""`): exit 1, a message in QEMU's
//! words plus what instar found, every file byte-for-byte unchanged.
//!
//! Each case also runs qemu-img 10.2 on a copy and checks what it does, as measured:
//! where it writes metadata over metadata ("Marking image as corrupt"), aborts, or loses
//! the overlay's content, the row says so (`QemuDoes`).

mod cli_support;

use cli_support::*;
use std::collections::BTreeMap;
use std::path::Path;

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The overlay's bytes, patched in memory.
struct Img(Vec<u8>);

impl Img {
    fn get(&self, at: u64) -> u64 {
        let a = at as usize;
        u64::from_be_bytes(self.0[a..a + 8].try_into().expect("8 bytes"))
    }
    fn put(&mut self, at: u64, v: u64) {
        let a = at as usize;
        self.0[a..a + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn l1(&self) -> u64 {
        self.get(40)
    }
    fn reftable(&self) -> u64 {
        self.get(48)
    }
    fn snapshots(&self) -> u64 {
        self.get(64)
    }
    fn l1e(&self, i: u64) -> u64 {
        self.get(self.l1() + 8 * i)
    }
    fn l2(&self, i: u64) -> u64 {
        self.l1e(i) & OFFSET_MASK
    }
    /// Set the 16-bit refcount of the 4 KiB cluster at `offset` (first refcount block).
    fn zero_refcount(&mut self, offset: u64) {
        let at = (self.get(self.reftable()) + 2 * (offset >> 12)) as usize;
        self.0[at..at + 2].copy_from_slice(&[0, 0]);
    }
}

/// What qemu-img 10.2 does with the same overlay (measured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QemuDoes {
    /// Exit status (`None`: killed by a signal, an assertion failure).
    status: Option<i32>,
    /// Its overlap check stopped a write and marked the image corrupt.
    marks_corrupt: bool,
    /// The overlay reads as before.
    keeps_content: bool,
}

struct Case {
    name: &'static str,
    /// 64 KiB clusters with extended L2 (subclusters written in place) instead of 4 KiB.
    extended_l2: bool,
    snapshot: bool,
    patch: fn(&mut Img),
    /// A piece of instar's message.
    says: &'static str,
    qemu: QemuDoes,
}

/// The rebase copies the whole 4 MiB disk: every cluster the overlay does not
/// allocate differs between base (0x11) and new (0x33).
fn fixture(q: &Qemu, dir: &Path, case: &Case) {
    let opts: &[&str] = if case.extended_l2 {
        &["-o", "cluster_size=64k,extended_l2=on"]
    } else {
        &["-o", "cluster_size=4k"]
    };
    create(q, dir, "qcow2", "base.qcow2", "4M", opts);
    create(q, dir, "qcow2", "new.qcow2", "4M", opts);
    let mut ov_opts = opts.to_vec();
    ov_opts.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
    create(q, dir, "qcow2", "ov.qcow2", "4M", &ov_opts);
    for (img, cmds) in [
        ("base.qcow2", vec!["write -P 0x11 0 4M"]),
        ("new.qcow2", vec!["write -P 0x33 0 4M"]),
        (
            "ov.qcow2",
            vec!["write -P 0x22 0 4k", "write -P 0x44 2M 4k"],
        ),
    ] {
        let mut a = Vec::new();
        for c in &cmds {
            a.extend_from_slice(&["-c", c]);
        }
        a.push(img);
        let r = run(&q.io, &a, dir);
        assert_eq!(r.status, 0, "qemu-io {img}: {}", r.stderr);
    }
    if case.snapshot {
        let r = run(&q.img, &["snapshot", "-c", "s1", "ov.qcow2"], dir);
        assert_eq!(r.status, 0, "snapshot: {}", r.stderr);
    }
    let path = dir.join("ov.qcow2");
    let mut img = Img(std::fs::read(&path).expect("read ov"));
    (case.patch)(&mut img);
    std::fs::write(&path, &img.0).expect("write ov");
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

/// The guest-visible content of `image` (with its backing chain), via qemu-img.
fn content(q: &Qemu, dir: &Path, image: &str) -> Vec<u8> {
    let out = format!("{image}.raw");
    let r = run(&q.img, &["convert", "-U", "-O", "raw", image, &out], dir);
    assert_eq!(r.status, 0, "convert {image}: {}", r.stderr);
    let data = std::fs::read(dir.join(&out)).expect("read raw");
    std::fs::remove_file(dir.join(&out)).expect("remove raw");
    data
}

fn check(case: &Case) {
    check_with(case, &[], case.qemu);
}

/// [`check`] with `extra` options before the others (`-c`), and what qemu-img does then.
fn check_with(case: &Case, extra: &[&str], qemu_does: QemuDoes) {
    if !require_kvm() {
        return;
    }
    let Some(q) = qemu() else {
        return;
    };
    for (mode, args) in [
        ("safe", ["-b", "new.qcow2", "-F", "qcow2"].as_slice()),
        ("flatten", ["-b", ""].as_slice()),
    ] {
        let scratch = Scratch::new(&format!("overlap-{}-{mode}{}", case.name, extra.len()));
        let dir = &scratch.0;
        fixture(&q, dir, case);
        let before = files(dir);

        let mut argv = vec!["rebase"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(args);
        argv.push("ov.qcow2");
        let r = instar(&argv, dir);
        let shown = format!("{} ({mode}): instar {argv:?}", case.name);
        assert_eq!(r.status, 1, "{shown}: exit status; stderr: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{shown}: stdout {:?}", r.stdout);
        assert!(
            r.stderr.starts_with("instar: ") && r.stderr.contains(case.says),
            "{shown}: stderr {:?} lacks {:?}",
            r.stderr,
            case.says
        );
        assert!(files(dir) == before, "{shown}: a file changed");

        // qemu-img 10.2 on a copy.
        std::fs::copy(dir.join("ov.qcow2"), dir.join("q.qcow2")).expect("copy");
        let want = content(&q, dir, "q.qcow2");
        let mut qargv = vec!["rebase"];
        qargv.extend_from_slice(extra);
        qargv.extend_from_slice(args);
        qargv.push("q.qcow2");
        let qr = std::process::Command::new(&q.img)
            .args(&qargv)
            .current_dir(dir)
            .output()
            .expect("run qemu-img");
        let qerr = String::from_utf8_lossy(&qr.stderr);
        let got = QemuDoes {
            status: qr.status.code(),
            marks_corrupt: qerr.contains("Marking image as corrupt"),
            keeps_content: content(&q, dir, "q.qcow2") == want,
        };
        assert_eq!(
            got, qemu_does,
            "{shown}: qemu-img 10.2 did otherwise: {qerr}"
        );
    }
}

/// Writes metadata over metadata, marks the image corrupt, exits 0, content lost.
const QEMU_CORRUPTS: QemuDoes = QemuDoes {
    status: Some(0),
    marks_corrupt: true,
    keeps_content: false,
};
/// Exits 0 and the content reads as before (the image stays as corrupt as it was).
const QEMU_GETS_AWAY: QemuDoes = QemuDoes {
    status: Some(0),
    marks_corrupt: false,
    keeps_content: true,
};

#[test]
fn l1_entry_names_the_refcount_block() {
    check(&Case {
        name: "l1-refblock",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let rb = i.get(i.reftable());
            i.put(i.l1(), rb | COPIED)
        },
        says: "Preventing invalid write on metadata (overlaps with refcount block): the active L2 table at 0x2000 (named by active L1 entry 0x0) overlaps with the refcount block at 0x2000 (named by refcount table entry 0x0)",
        qemu: QEMU_CORRUPTS,
    });
}

#[test]
fn l1_entry_names_the_refcount_table() {
    check(&Case {
        name: "l1-reftable",
        extended_l2: false,
        snapshot: false,
        patch: |i| i.put(i.l1(), i.reftable() | COPIED),
        says: "(overlaps with refcount table): the active L2 table at 0x1000 (named by active L1 entry 0x0) overlaps with the refcount table at 0x1000 (named by the header)",
        qemu: QEMU_CORRUPTS,
    });
}

#[test]
fn l1_entry_names_the_l1_table() {
    check(&Case {
        name: "l1-l1",
        extended_l2: false,
        snapshot: false,
        patch: |i| i.put(i.l1(), i.l1() | COPIED),
        says: "(overlaps with active L1 table): the active L2 table at 0x3000 (named by active L1 entry 0x0)",
        qemu: QEMU_CORRUPTS,
    });
}

/// An L1 entry at offset 0 (the header cluster) that claims to own its table: qemu-img
/// aborts on an assertion.
#[test]
fn l1_entry_names_the_header_cluster() {
    check(&Case {
        name: "l1-header",
        extended_l2: false,
        snapshot: false,
        patch: |i| i.put(i.l1(), COPIED),
        says: "L1 entry COPIED without a table",
        qemu: QemuDoes {
            status: None,
            marks_corrupt: false,
            keeps_content: true,
        },
    });
}

#[test]
fn two_l1_entries_name_one_l2_table() {
    check(&Case {
        name: "two-l1",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let e = i.l1e(0);
            i.put(i.l1() + 8, e)
        },
        says: "(named by active L1 entry 0x0) and the active L2 table at 0x4000 (named by active L1 entry 0x1) are one active L2 table, which the rebase would write through",
        qemu: QEMU_GETS_AWAY,
    });
}

/// Extended L2: the rebase writes the unallocated subclusters of a cluster in place, so
/// two entries naming one cluster would have both guest clusters written into it.
#[test]
fn two_l2_entries_name_one_data_cluster() {
    check(&Case {
        name: "two-l2",
        extended_l2: true,
        snapshot: false,
        patch: |i| {
            let l2 = i.l2(0);
            let (e, b) = (i.get(l2), i.get(l2 + 8));
            i.put(l2 + 16, e);
            i.put(l2 + 24, b);
        },
        says: "Preventing invalid write on data: the data cluster at 0x50000 (named by L2 entry 0x0 of the table at 0x40000) and the data cluster at 0x50000 (named by L2 entry 0x1",
        qemu: QEMU_GETS_AWAY,
    });
}

#[test]
fn l2_entry_names_the_l1_table() {
    check(&Case {
        name: "l2-l1",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let l2 = i.l2(0);
            i.put(l2, i.l1() | COPIED)
        },
        says: "(overlaps with active L1 table): the data cluster at 0x3000 (named by L2 entry 0x0 of the table at 0x4000)",
        qemu: QEMU_GETS_AWAY,
    });
}

#[test]
fn l2_entry_names_the_snapshot_table() {
    check(&Case {
        name: "l2-snaptable",
        extended_l2: false,
        snapshot: true,
        patch: |i| {
            let l2 = i.l2(0);
            i.put(l2, i.snapshots())
        },
        says: "(overlaps with snapshot table): the data cluster at",
        qemu: QEMU_GETS_AWAY,
    });
}

#[test]
fn snapshot_l1_table_over_an_active_l2_table() {
    check(&Case {
        name: "snap-l1",
        extended_l2: false,
        snapshot: true,
        patch: |i| {
            let l2 = i.l2(1);
            i.put(i.snapshots(), l2)
        },
        says: "(overlaps with active L2 table): the inactive L1 table at 0x6000 (named by snapshot 0) overlaps with the active L2 table at 0x6000 (named by active L1 entry 0x1)",
        qemu: QEMU_GETS_AWAY,
    });
}

#[test]
fn refcount_table_entry_names_an_l2_table() {
    check(&Case {
        name: "reftable-l2",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let l2 = i.l2(0);
            i.put(i.reftable() + 8, l2)
        },
        says: "(overlaps with refcount block): the active L2 table at 0x4000 (named by active L1 entry 0x0) overlaps with the refcount block at 0x4000 (named by refcount table entry 0x1)",
        qemu: QEMU_CORRUPTS,
    });
}

/// The last L2 table and its data cluster claim refcount 0: the allocator would take the
/// table first. qemu-img's overlap check stops that write and fails.
#[test]
fn refcount_zero_on_an_l2_table_in_use() {
    check(&Case {
        name: "rc0-l2",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let l2 = i.l2(1);
            let data = i.get(l2) & OFFSET_MASK;
            i.zero_refcount(l2);
            i.zero_refcount(data);
        },
        says: "(overlaps with active L2 table): cluster 0x6000 has refcount 0, so it would be allocated, but it holds the active L2 table at 0x6000",
        qemu: QemuDoes {
            status: Some(1),
            marks_corrupt: true,
            keeps_content: true,
        },
    });
}

/// A data cluster in use claims refcount 0: qemu-img allocates it for new data and the
/// overlay loses what it held.
#[test]
fn refcount_zero_on_a_data_cluster_in_use() {
    check(&Case {
        name: "rc0-data",
        extended_l2: false,
        snapshot: false,
        patch: |i| {
            let l2 = i.l2(1);
            let data = i.get(l2) & OFFSET_MASK;
            i.zero_refcount(data);
        },
        says: "cluster 0x7000 has refcount 0, so it would be allocated, but it holds the data cluster at 0x7000",
        qemu: QemuDoes {
            status: Some(0),
            marks_corrupt: false,
            keeps_content: false,
        },
    });
}

/// The same two lies with `-c`: compressed clusters are packed into the clusters the
/// allocator takes, so a table or data cluster that claims refcount 0 would receive
/// compressed data; instar refuses before any write.
#[test]
fn compressed_writes_refuse_a_table_claiming_refcount_zero() {
    check_with(
        &Case {
            name: "rc0-l2-c",
            extended_l2: false,
            snapshot: false,
            patch: |i| {
                let l2 = i.l2(1);
                let data = i.get(l2) & OFFSET_MASK;
                i.zero_refcount(l2);
                i.zero_refcount(data);
            },
            says: "(overlaps with active L2 table): cluster 0x6000 has refcount 0, so it would be allocated, but it holds the active L2 table at 0x6000",
            qemu: QEMU_GETS_AWAY,
        },
        &["-c"],
        QemuDoes {
            status: Some(1),
            marks_corrupt: true,
            keeps_content: true,
        },
    );
}

#[test]
fn compressed_writes_refuse_a_data_cluster_claiming_refcount_zero() {
    check_with(
        &Case {
            name: "rc0-data-c",
            extended_l2: false,
            snapshot: false,
            patch: |i| {
                let l2 = i.l2(1);
                let data = i.get(l2) & OFFSET_MASK;
                i.zero_refcount(data);
            },
            says: "cluster 0x7000 has refcount 0, so it would be allocated, but it holds the data cluster at 0x7000",
            qemu: QEMU_GETS_AWAY,
        },
        &["-c"],
        QemuDoes {
            status: Some(0),
            marks_corrupt: false,
            keeps_content: false,
        },
    );
}

/// The active L1 entries claim (COPIED) the L2 tables they share with a snapshot: the
/// rebase would write through the snapshot's tables. qemu-img's default overlap check
/// does not look at inactive L2 tables; here the data it writes equals what the snapshot
/// showed through the old backing, so the content survives by chance.
#[test]
fn active_l1_claims_tables_shared_with_a_snapshot() {
    check(&Case {
        name: "copied-snap",
        extended_l2: false,
        snapshot: true,
        patch: |i| {
            for k in 0..2 {
                let e = i.l1e(k);
                i.put(i.l1() + 8 * k, e | COPIED);
            }
        },
        says: "Preventing invalid write on metadata (overlaps with inactive L2 table): an L2 table write at 0x4000 would land on the inactive L2 table at 0x4000 (named by L1 entry 0x0 of snapshot 0)",
        qemu: QEMU_GETS_AWAY,
    });
}

/// A vmdk overlay whose grain directory names one grain table twice: the rebase would
/// write the entries of both 32 MiB halves into one table. qemu-img fails every vmdk
/// rebase ("Operation not supported"), after copying; instar refuses this one before
/// any write.
#[test]
fn vmdk_two_directory_entries_name_one_grain_table() {
    if !require_kvm() {
        return;
    }
    let Some(q) = qemu() else {
        return;
    };
    for (mode, args) in [
        ("safe", ["-b", "new.vmdk", "-F", "vmdk"].as_slice()),
        ("flatten", ["-b", ""].as_slice()),
    ] {
        let scratch = Scratch::new(&format!("overlap-vmdk-{mode}"));
        let dir = &scratch.0;
        // Parents first: writing one changes its CID, which its child records.
        for (img, parent, cmd) in [
            ("base.vmdk", None, "write -P 0x11 0 64M"),
            ("new.vmdk", None, "write -P 0x33 0 64M"),
            ("ov.vmdk", Some("base.vmdk"), "write -P 0x22 40M 64k"),
        ] {
            let opts = parent.map_or(vec![], |p| vec!["-b", p, "-F", "vmdk"]);
            create(&q, dir, "vmdk", img, "64M", &opts);
            let r = run(&q.io, &["-f", "vmdk", "-c", cmd, img], dir);
            assert_eq!(r.status, 0, "qemu-io {img}: {}", r.stderr);
        }
        // Grain directory entry 1 := entry 0 (sparse header: gd_offset at byte 56).
        let path = dir.join("ov.vmdk");
        let mut b = std::fs::read(&path).expect("read");
        let gd = u64::from_le_bytes(b[56..64].try_into().expect("8 bytes")) as usize * 512;
        let e0: [u8; 4] = b[gd..gd + 4].try_into().expect("4 bytes");
        b[gd + 4..gd + 8].copy_from_slice(&e0);
        std::fs::write(&path, &b).expect("write");
        let before = files(dir);

        let mut argv = vec!["rebase"];
        argv.extend_from_slice(args);
        argv.push("ov.vmdk");
        let r = instar(&argv, dir);
        assert_eq!(r.status, 1, "{mode}: {}", r.stderr);
        assert!(
            r.stderr.starts_with(
                "instar: Preventing invalid write on metadata: the grain table of grain directory entry 1"
            ) && r.stderr.contains("overlaps with the grain table of grain directory entry 0"),
            "{mode}: {}",
            r.stderr
        );
        assert!(files(dir) == before, "{mode}: a file changed");

        // qemu-img copies grains into the overlay first and fails only at the backing
        // change: the file is written, then the command fails.
        std::fs::copy(&path, dir.join("q.vmdk")).expect("copy");
        let mut qargv = vec!["rebase"];
        qargv.extend_from_slice(args);
        qargv.push("q.vmdk");
        let qr = run(&q.img, &qargv, dir);
        assert_eq!(qr.status, 1, "{mode}: qemu-img: {}", qr.stderr);
        assert!(
            qr.stderr.contains("Operation not supported"),
            "{}",
            qr.stderr
        );
        let written = std::fs::read(dir.join("q.vmdk")).expect("read");
        assert!(
            written != before["ov.vmdk"],
            "{mode}: qemu-img left the file alone"
        );
    }
}

/// `-u` rewrites all of cluster 0. A table the header places there (QEMU's open accepts
/// the aligned offset 0) is refused when the rewrite would change its bytes, and left
/// alone, as qemu-img leaves it, when the rewrite keeps them.
#[test]
fn unsafe_header_rewrite_over_a_table_in_cluster_0() {
    if !require_kvm() {
        return;
    }
    let Some(q) = qemu() else {
        return;
    };
    // (name, header field moved to offset 0, instar refuses)
    for (name, field, refused) in [
        // l1_size 1: the only entry is the magic and version, which the rewrite keeps.
        ("l1", 40u64, false),
        // The refcount table spans the whole cluster, backing name included.
        ("reftable", 48, true),
    ] {
        let scratch = Scratch::new(&format!("overlap-cluster0-{name}"));
        let dir = &scratch.0;
        create(&q, dir, "raw", "base.raw", "1M", &[]);
        create(
            &q,
            dir,
            "qcow2",
            "ov.qcow2",
            "1M",
            &["-b", "base.raw", "-F", "raw"],
        );
        let path = dir.join("ov.qcow2");
        let mut img = Img(std::fs::read(&path).expect("read ov"));
        img.put(field, 0);
        std::fs::write(&path, &img.0).expect("write ov");
        std::fs::copy(&path, dir.join("q.qcow2")).expect("copy");
        let before = std::fs::read(&path).expect("read ov");

        let args = ["rebase", "-u", "-b", "other.raw", "-F", "raw"];
        let r = instar(&[&args[..], &["ov.qcow2"]].concat(), dir);
        let qr = run(&q.img, &[&args[..], &["q.qcow2"]].concat(), dir);
        if refused {
            assert_eq!(r.status, 1, "{name}: {}", r.stderr);
            assert!(
                r.stderr.contains(
                    "Preventing invalid write on metadata (overlaps with qcow2_header): \
                     the refcount table at 0x0 lies in cluster 0"
                ),
                "{name}: {}",
                r.stderr
            );
            assert_eq!(std::fs::read(&path).expect("read ov"), before, "{name}");
            // qemu-img rewrites the table along with the header.
            assert_eq!(qr.status, 0, "{name}: qemu-img: {}", qr.stderr);
            assert_ne!(std::fs::read(dir.join("q.qcow2")).expect("read q"), before);
        } else {
            assert_eq!(r.status, 0, "{name}: {}", r.stderr);
            assert_eq!(qr.status, 0, "{name}: qemu-img: {}", qr.stderr);
            assert_eq!(
                std::fs::read(&path).expect("read ov"),
                std::fs::read(dir.join("q.qcow2")).expect("read q"),
                "{name}: instar and qemu-img 10.2 differ"
            );
        }
    }
}
