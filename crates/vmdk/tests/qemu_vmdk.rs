//! vmdk reads against real QEMU: content equals `qemu-img convert -O raw`, block
//! status (merged) equals `qemu-img map --output=json`.

mod common;

use std::path::Path;

use common::*;
use instar_blockdev::MemDev;
use instar_vmdk::{GrainKind, VmdkImage};

fn open(file: &Path) -> VmdkImage<MemDev> {
    VmdkImage::open(MemDev::read_only(std::fs::read(file).unwrap())).unwrap()
}

fn check(q: &Path, file: &Path, d: &Scratch) {
    let mut img = open(file);
    let expect = convert_raw(q, file, d);
    assert_eq!(img.virtual_size(), expect.len() as u64);
    let mut got = vec![0x5au8; expect.len()];
    img.read(0, &mut got).unwrap();
    assert!(got == expect, "content differs for {}", file.display());
    let size = img.virtual_size();
    let mut ours = Vec::new();
    let mut off = 0;
    while off < size {
        let st = img.block_status(off, size - off).unwrap();
        assert!(st.bytes > 0 && st.bytes <= img.grain_size());
        let present = st.kind.is_allocated();
        push_merged(
            &mut ours,
            MapEntry {
                start: off,
                length: st.bytes,
                depth: 0,
                present,
                zero: !present || st.kind == GrainKind::Zero,
                data: matches!(st.kind, GrainKind::Allocated | GrainKind::Compressed),
                compressed: st.kind == GrainKind::Compressed,
                offset: st.host_offset,
            },
        );
        off += st.bytes;
    }
    let theirs = parse_map(&run(q, &["map", "--output=json", file.to_str().unwrap()]));
    assert_eq!(ours, theirs, "map differs for {}", file.display());
}

const CMDS: &[&str] = &[
    "write -P 0x11 0 100k",
    "write -P 0x22 1M 64k",
    "write -P 0x33 3000k 5k",
    "write -z 2M 128k",
    "write -P 0x44 4M 4k",
    "write -P 0x45 33M 64k",
];

#[test]
fn monolithic_sparse_made_by_qemu() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("vmdk");
    let f = d.path("a.vmdk");
    let fs = f.to_str().unwrap();
    run(&q, &["create", "-q", "-f", "vmdk", fs, "40M"]);
    qio(&q, "vmdk", &f, CMDS);
    let img = open(&f);
    assert_eq!(img.descriptor().parent_cid, 0xffff_ffff);
    assert_eq!(
        img.descriptor().create_type.as_deref(),
        Some(&b"monolithicSparse"[..])
    );
    assert_eq!(img.grain_size(), 65536);
    check(&q, &f, &d);

    // Zeroed grains (GTE 1).
    let z = d.path("z.vmdk");
    let zs = z.to_str().unwrap();
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            zs,
            "8M",
        ],
    );
    qio(
        &q,
        "vmdk",
        &z,
        &["write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 192k"],
    );
    let mut img = open(&z);
    assert_eq!(
        img.block_status(1 << 20, 1 << 20).unwrap().kind,
        GrainKind::Zero
    );
    check(&q, &z, &d);

    // Converted from qcow2, with an odd size.
    let src = d.path("src.qcow2");
    let ss = src.to_str().unwrap();
    run(&q, &["create", "-q", "-f", "qcow2", ss, "5000k"]);
    qio(
        &q,
        "qcow2",
        &src,
        &["write -P 0x61 0 64k", "write -P 0x62 4900k 100k"],
    );
    let c = d.path("conv.vmdk");
    run(&q, &["convert", "-O", "vmdk", ss, c.to_str().unwrap()]);
    check(&q, &c, &d);
}

#[test]
fn stream_optimized_or_clear_refusal() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("vmdkso");
    let src = d.path("src.qcow2");
    let ss = src.to_str().unwrap();
    run(&q, &["create", "-q", "-f", "qcow2", ss, "3M"]);
    qio(
        &q,
        "qcow2",
        &src,
        &["write -P 0x71 0 200k", "write -P 0x72 2M 64k"],
    );
    let c = d.path("so.vmdk");
    run(
        &q,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            ss,
            c.to_str().unwrap(),
        ],
    );
    match VmdkImage::open(MemDev::read_only(std::fs::read(&c).unwrap())) {
        Ok(img) => {
            assert_eq!(img.create_type(), "streamOptimized");
            check(&q, &c, &d);
        }
        Err(e) => assert_eq!(e, instar_vmdk::VmdkError::GdAtEnd),
    }
}

#[test]
fn corrupted_vmdk_gives_errors_not_panics() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("vmdkfuzz");
    let f = d.path("a.vmdk");
    run(
        &q,
        &["create", "-q", "-f", "vmdk", f.to_str().unwrap(), "2M"],
    );
    qio(&q, "vmdk", &f, &["write -P 1 0 300k", "write -P 2 1M 64k"]);
    let orig = std::fs::read(&f).unwrap();
    let gd = open(&f).header().gd_offset as usize * 512;
    let mut x: u64 = 12345;
    let mut errors = 0;
    for _ in 0..400 {
        let mut data = orig.clone();
        for _ in 0..4 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // The header, or the grain directory and the tables after it.
            let r = (x >> 20) as usize;
            let pos = if r.is_multiple_of(2) {
                r / 2 % 80
            } else {
                gd + r / 2 % 8192
            };
            data[pos] = (x >> 40) as u8;
        }
        match VmdkImage::open(MemDev::read_only(data)) {
            Err(_) => errors += 1,
            Ok(mut img) => {
                let size = img.virtual_size().min(16 << 20);
                let mut off = 0;
                while off < size {
                    match img.block_status(off, size - off) {
                        Ok(st) => off += st.bytes.max(1),
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                let mut buf = vec![0u8; size as usize];
                let _ = img.read(0, &mut buf);
            }
        }
    }
    assert!(errors > 0);
}
