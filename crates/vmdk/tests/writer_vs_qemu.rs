//! The writer against qemu-io: the same writes to copies of one image give the same
//! file, byte for byte, except the descriptor (QEMU gives the image a new CID on its
//! first write; the writer leaves the descriptor alone).

mod common;

use std::path::Path;

use common::*;
use instar_blockdev::{IoError, MemDev};
use instar_vmdk::writer::{check_rewritable, WriteError};
use instar_vmdk::{Below, SparseWriter, VmdkImage};

const DESC: std::ops::Range<usize> = 512..512 + 10240;

/// The layer below: one parentless vmdk.
struct Parent(VmdkImage<MemDev>);

impl Below for Parent {
    fn read_below(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read(offset, buf).map_err(|_| IoError::Device)
    }
}

enum W {
    Data(u8, u64, u64),
    Zero(u64, u64),
}

const K: u64 = 1024;

fn writes() -> Vec<W> {
    vec![
        W::Data(0x11, 0, 64 * K),
        // Partial grain: the rest comes from the parent (or zeros).
        W::Data(0x22, 100 * K, 10 * K),
        // Whole grains: zeroed entries when the image allows them.
        W::Zero(256 * K, 128 * K),
        // Partial zero write: always zero data.
        W::Zero(400 * K, 4 * K),
        // Several grains, partial at both ends.
        W::Data(0x33, 1000 * K, 200 * K),
        // In place, on an allocated grain.
        W::Data(0x44, 100 * K, 4 * K),
        // Zeroes over an allocated grain.
        W::Zero(0, 64 * K),
        // The last, partial grain of the image.
        W::Data(0x55, 4096 * K, 16 * K),
    ]
}

fn qemu_cmd(w: &W) -> String {
    match *w {
        W::Data(p, o, l) => format!("write -P {p:#x} {o} {l}"),
        W::Zero(o, l) => format!("write -z {o} {l}"),
    }
}

fn case(q: &Path, zeroed: &str, with_parent: bool) {
    let d = Scratch::new("vmdkw");
    let base = d.path("base.vmdk");
    let ovl = d.path("ovl.vmdk");
    let size = "4128k";
    let opt = format!("zeroed_grain={zeroed}");
    run(
        q,
        &["create", "-q", "-f", "vmdk", base.to_str().unwrap(), size],
    );
    qio(
        q,
        "vmdk",
        &base,
        &["write -P 0x61 0 4128k", "write -P 0x62 96k 64k"],
    );
    let mut args = vec!["create", "-q", "-f", "vmdk", "-o", &opt];
    let backing = ["-b", "base.vmdk", "-F", "vmdk"];
    if with_parent {
        args.extend(backing);
    }
    args.extend([ovl.to_str().unwrap(), size]);
    let out = std::process::Command::new(q)
        .args(&args)
        .current_dir(&d.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let original = std::fs::read(&ovl).unwrap();

    let cmds: Vec<String> = writes().iter().map(qemu_cmd).collect();
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qio(q, "vmdk", &ovl, &cmd_refs);
    let theirs = std::fs::read(&ovl).unwrap();

    let mut w = SparseWriter::open(MemDev::new(original.clone())).unwrap();
    let mut parent =
        Parent(VmdkImage::open(MemDev::read_only(std::fs::read(&base).unwrap())).unwrap());
    for op in writes() {
        let (o, l, zero) = match op {
            W::Data(_, o, l) => (o, l, false),
            W::Zero(o, l) => (o, l, true),
        };
        w.check(o, l, zero).unwrap();
    }
    for op in writes() {
        let below = with_parent.then_some(&mut parent as &mut dyn Below);
        match op {
            W::Data(p, o, l) => w.write(o, &vec![p; l as usize], below).unwrap(),
            W::Zero(o, l) => w.write_zeroes(o, l, below).unwrap(),
        }
    }
    let (dev, end) = w.finish().unwrap();
    let ours = dev.data;
    assert_eq!(end, ours.len() as u64);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "zeroed_grain={zeroed} parent={with_parent}"
    );
    assert_eq!(ours[..DESC.start], theirs[..DESC.start]);
    assert_eq!(
        ours[DESC.end..],
        theirs[DESC.end..],
        "zeroed_grain={zeroed} parent={with_parent}"
    );
    assert_eq!(ours[DESC], original[DESC]);

    // And QEMU reads the same disk from it.
    let mine = d.path("mine.vmdk");
    std::fs::write(&mine, &ours).unwrap();
    run(q, &["check", mine.to_str().unwrap()]);
    if !with_parent {
        run(
            q,
            &["compare", ovl.to_str().unwrap(), mine.to_str().unwrap()],
        );
    }
}

#[test]
fn same_file_as_qemu_io() {
    let Some(q) = qemu_img() else { return };
    for zeroed in ["off", "on"] {
        for parent in [false, true] {
            case(&q, zeroed, parent);
        }
    }
}

#[test]
fn refusals_before_any_write() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("vmdkw-refuse");
    let f = d.path("a.vmdk");
    run(
        &q,
        &["create", "-q", "-f", "vmdk", f.to_str().unwrap(), "1M"],
    );
    let good = std::fs::read(&f).unwrap();

    let mut w = SparseWriter::open(MemDev::new(good.clone())).unwrap();
    assert_eq!(
        w.check(1 << 20, 1, false),
        Err(WriteError::BeyondVirtualSize {
            offset: 1 << 20,
            len: 1
        })
    );
    // A grain table missing from the directory (QEMU preallocates them all).
    let gd_offset = u64::from_le_bytes(good[56..64].try_into().unwrap()) as usize * 512;
    let mut no_gt = good.clone();
    no_gt[gd_offset..gd_offset + 4].fill(0);
    let mut w = SparseWriter::open(MemDev::new(no_gt)).unwrap();
    assert_eq!(w.check(0, 512, false), Err(WriteError::NoGrainTable(0)));
    // The redundant table pointing over the descriptor.
    let rgd_offset = u64::from_le_bytes(good[48..56].try_into().unwrap()) as usize * 512;
    let mut bad_rgd = good.clone();
    bad_rgd[rgd_offset..rgd_offset + 4].copy_from_slice(&2u32.to_le_bytes());
    let mut w = SparseWriter::open(MemDev::new(bad_rgd)).unwrap();
    assert_eq!(w.check(0, 512, false), Err(WriteError::BadGrainTable(1024)));
    // Version 3 must be read only; a descriptor area that overlaps the tables.
    let mut v3 = good.clone();
    v3[4] = 3;
    let img = VmdkImage::open(MemDev::read_only(v3)).unwrap();
    assert_eq!(
        check_rewritable(img.header(), img.is_compressed()),
        Err(WriteError::Version3)
    );
    let mut small_desc = good.clone();
    small_desc[36] = 10;
    assert!(matches!(
        SparseWriter::open(MemDev::new(small_desc)).err(),
        Some(WriteError::DescriptorArea { .. })
    ));
    // Two directory entries naming one grain table: refused when the writer opens.
    let mut shared = vec![0u8; 0];
    shared.extend_from_slice(&good);
    let gt0: [u8; 4] = good[rgd_offset..rgd_offset + 4].try_into().unwrap();
    shared[gd_offset..gd_offset + 4].copy_from_slice(&gt0);
    match SparseWriter::open(MemDev::new(shared)).err() {
        Some(WriteError::Overlap(o)) => {
            assert_eq!(o.a_offset, o.b_offset);
            assert!(o
                .to_string()
                .starts_with("Preventing invalid write on metadata: the grain table of"));
        }
        other => panic!("{other:?}"),
    }
    // A grain table over the grain directory.
    let mut over_gd = good.clone();
    over_gd[gd_offset..gd_offset + 4].copy_from_slice(&((gd_offset / 512) as u32).to_le_bytes());
    assert!(matches!(
        SparseWriter::open(MemDev::new(over_gd)).err(),
        Some(WriteError::Overlap(_))
    ));
}
