//! The read path against real QEMU: images made with qemu-img/qemu-io, read through
//! `Qcow2Image`, compared with `qemu-img convert -O raw` (content) and
//! `qemu-img map --output=json` (allocation), refcounts checked against the metadata.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use instar_blockdev::{BlockDev, MemDev};
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::map::ClusterKind;
use instar_qcow2::refcount::RefcountReader;
use instar_qcow2::{Header, OpenMode};

fn load(file: &Path) -> (Header, MemDev) {
    let mut dev = MemDev::read_only(std::fs::read(file).unwrap());
    let h = Header::read(&mut dev, OpenMode::ReadOnly).unwrap();
    (h, dev)
}

fn open(file: &Path) -> Qcow2Image<MemDev> {
    let (h, dev) = load(file);
    Qcow2Image::open(dev, &h).unwrap()
}

/// Our block status over the whole disk, merged the way qemu-img map merges, for a
/// layer without backing (unallocated reads as zero).
fn our_map(img: &mut Qcow2Image<MemDev>) -> (Vec<MapEntry>, usize) {
    let size = img.virtual_size();
    let mut v = Vec::new();
    let mut off = 0;
    let mut calls = 0;
    while off < size {
        let m = img.block_status(off, size - off).unwrap();
        assert!(m.bytes > 0 && m.bytes <= size - off);
        calls += 1;
        let present = m.kind.is_allocated();
        push_merged(
            &mut v,
            MapEntry {
                start: off,
                length: m.bytes,
                depth: 0,
                present,
                zero: m.kind.is_zero() || !present,
                data: matches!(m.kind, ClusterKind::Normal | ClusterKind::Compressed),
                compressed: m.kind == ClusterKind::Compressed,
                offset: m.host_offset,
            },
        );
        off += m.bytes;
    }
    (v, calls)
}

/// Content, allocation and refcounts of one standalone qcow2 image against QEMU.
fn check_image(qimg: &Path, file: &Path, dir: &Scratch) {
    let mut img = open(file);
    let expect = convert_raw(qimg, file, dir);
    assert_eq!(expect.len() as u64, img.virtual_size());
    let mut got = vec![0xa5u8; expect.len()];
    img.read(0, &mut got).unwrap();
    assert!(
        got == expect,
        "content differs from qemu-img convert for {}",
        file.display()
    );
    // Unaligned small reads agree too.
    for &(o, l) in &[(1u64, 700usize), (65535, 3), (4095, 8193)] {
        if o + l as u64 <= expect.len() as u64 {
            let mut b = vec![0u8; l];
            img.read(o, &mut b).unwrap();
            assert_eq!(b, expect[o as usize..o as usize + l]);
        }
    }
    let (ours, _) = our_map(&mut img);
    let theirs = map_layer_qcow2(qimg, file);
    assert_eq!(ours, theirs, "map differs for {}", file.display());
    check_refcounts(file);
}

/// Every host cluster's refcount equals the references found in the metadata (the
/// images here have no snapshots or bitmaps, and `qemu-img check` finds them clean).
fn check_refcounts(file: &Path) {
    let (h, mut dev) = load(file);
    let cs = h.cluster_size();
    let mut refs: HashMap<u64, u64> = HashMap::new();
    let mut add = |off: u64, len: u64| {
        let mut c = off / cs;
        while c * cs < off + len {
            *refs.entry(c).or_default() += 1;
            c += 1;
        }
    };
    add(0, cs);
    add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    add(h.l1_table_offset, u64::from(h.l1_size) * 8);
    let mut rc = RefcountReader::load(&mut dev, &h).unwrap();
    for &e in rc.table() {
        if e != 0 {
            add(e & !511, cs);
        }
    }
    let img = Qcow2Image::open(dev.clone(), &h).unwrap();
    let fmt = img.entry_format();
    let esize = if h.extended_l2() { 16 } else { 8 };
    for &l1e in img.l1_table() {
        let l2 = l1e & instar_qcow2::entry::L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        add(l2, cs);
        let mut t = vec![0u8; cs as usize];
        dev.read_at(l2, &mut t).unwrap();
        for c in t.chunks_exact(esize) {
            let e = u64::from_be_bytes(c[..8].try_into().unwrap());
            if e & instar_qcow2::entry::OFLAG_COMPRESSED != 0 {
                let x = instar_qcow2::map::compressed_extent(&fmt, e);
                let start = x.offset & !511;
                add(start, x.offset + x.len - start);
            } else if e & instar_qcow2::entry::L2E_OFFSET_MASK != 0 {
                add(e & instar_qcow2::entry::L2E_OFFSET_MASK, cs);
            }
        }
    }
    let clusters = dev.size().div_ceil(cs) + 4;
    for c in 0..clusters {
        let want = refs.get(&c).copied().unwrap_or(0);
        let got = rc.refcount(&mut dev, c).unwrap();
        assert_eq!(got, want, "refcount of cluster {c} in {}", file.display());
    }
}

fn make(
    qimg: &Path,
    dir: &Scratch,
    name: &str,
    opts: &str,
    size: &str,
    cmds: &[&str],
) -> std::path::PathBuf {
    let f = dir.path(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    let fs = f.to_str().unwrap().to_string();
    args.push(&fs);
    args.push(size);
    run(qimg, &args);
    if !cmds.is_empty() {
        qio(qimg, "qcow2", &f, cmds);
    }
    let chk = run(qimg, &["check", "--output=json", &fs]);
    assert!(
        !chk.contains("\"corruptions\": ") || chk.contains("\"corruptions\": 0"),
        "{chk}"
    );
    f
}

const MIXED: &[&str] = &[
    "write -P 0x11 0 100k",
    "write -P 0x22 1M 64k",
    "write -z 2M 128k",
    "write -c -P 0x33 3M 64k",
    "write -c -P 0x34 3136k 64k",
    "write -P 0x44 5M 4k",
    "discard 0 64k",
    "write -P 0x55 7M 1k",
    "write -c -P 0x66 6M 64k",
    "write -P 0x67 6M 4k",
];

#[test]
fn v3_64k_zlib_mixed() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("v3zlib");
    let f = make(&q, &d, "a.qcow2", "", "8M", MIXED);
    check_image(&q, &f, &d);
}

#[test]
fn v3_64k_zstd_mixed() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("v3zstd");
    let f = make(&q, &d, "a.qcow2", "compression_type=zstd", "8M", MIXED);
    assert_eq!(
        open(&f).compression_type(),
        instar_qcow2::compress::CompressionType::Zstd
    );
    check_image(&q, &f, &d);
}

#[test]
fn v2_compat_010() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("v2");
    let f = make(&q, &d, "a.qcow2", "compat=0.10", "8M", MIXED);
    assert_eq!(open(&f).version(), 2);
    check_image(&q, &f, &d);
}

#[test]
fn extended_l2_subclusters() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("extl2");
    let cmds = [
        "write -P 1 0 2k",
        "write -P 2 6k 4k",
        "write -z 66k 4k",
        "write -z 128k 64k",
        "write -P 3 256k 64k",
        "discard 260k 2k",
        "write -z 300k 2k",
        "write -c -P 4 384k 64k",
        "write -P 5 1M 2k",
        "write -P 6 1086k 2k",
        "write -P 7 4094k 2k",
    ];
    let f = make(&q, &d, "a.qcow2", "extended_l2=on", "4M", &cmds);
    let mut img = open(&f);
    assert_eq!(img.subcluster_size(), 2048);
    // Kinds inside one cluster: subcluster 0 data, 1 unallocated-alloc, 3..4 data.
    assert_eq!(
        img.block_status(0, 1 << 20).unwrap().kind,
        ClusterKind::Normal
    );
    let m = img.block_status(2048, 1 << 20).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::UnallocatedAlloc, 4096));
    check_image(&q, &f, &d);
    let f = make(
        &q,
        &d,
        "b.qcow2",
        "extended_l2=on,cluster_size=2M",
        "16M",
        &["write -P 9 64k 64k", "write -z 4M 128k", "write -P 8 6M 2M"],
    );
    check_image(&q, &f, &d);
}

#[test]
fn cluster_sizes_and_refcount_widths() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("sizes");
    for (i, (opts, cs)) in [
        ("cluster_size=512", 512),
        ("cluster_size=512,refcount_bits=1", 512),
        ("cluster_size=4k,refcount_bits=1", 4096),
        ("cluster_size=4k,refcount_bits=64", 4096),
        ("cluster_size=64k,refcount_bits=2", 65536),
        ("cluster_size=64k,refcount_bits=4", 65536),
        ("cluster_size=64k,refcount_bits=8", 65536),
        ("cluster_size=64k,refcount_bits=32", 65536),
        ("cluster_size=2M,refcount_bits=64", 2 << 20),
        ("cluster_size=2M,compat=0.10", 2 << 20),
    ]
    .iter()
    .enumerate()
    {
        // Compressed writes must cover whole clusters: three neighbours, to share host
        // clusters.
        let c1 = format!("write -c -P 0x30 {} {cs}", (8 << 20) + 2 * cs);
        let c2 = format!("write -c -P 0x31 {} {cs}", (8 << 20) + 3 * cs);
        let c3 = format!("write -c -P 0x32 {} {cs}", (8 << 20) + 4 * cs);
        let mut cmds = vec![
            "write -P 0x10 0 3k",
            "write -P 0x20 7k 1k",
            "write -z 64k 8k",
            &c1,
        ];
        // 1-bit refcounts cannot count a host cluster shared by compressed clusters.
        if !opts.contains("refcount_bits=1") {
            cmds.extend([c2.as_str(), c3.as_str()]);
        }
        cmds.extend(["write -P 0x40 1M 130k", "discard 1M 4k"]);
        let size = ((8 << 20) + 6 * cs).to_string();
        let f = make(&q, &d, &format!("s{i}.qcow2"), opts, &size, &cmds);
        check_image(&q, &f, &d);
    }
    // A whole compressed 2 MiB cluster.
    let f = make(
        &q,
        &d,
        "c2m.qcow2",
        "cluster_size=2M",
        "4M",
        &["write -c -P 0x77 0 2M", "write -c -P 0x78 2M 2M"],
    );
    assert_eq!(
        open(&f).block_status(0, 4 << 20).unwrap().kind,
        ClusterKind::Compressed
    );
    check_image(&q, &f, &d);
}

#[test]
fn runs_stop_at_l2_slice_ends() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("slices");
    // 512-byte clusters: an L2 table is 64 entries, so runs stop every 32 KiB.
    let f = make(
        &q,
        &d,
        "small.qcow2",
        "cluster_size=512",
        "1M",
        &["write -P 1 0 100k"],
    );
    let mut img = open(&f);
    assert_eq!(img.l2_slice_entries(), 64);
    let m = img.block_status(0, 1 << 20).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::Normal, 32 << 10));
    let m = img.block_status(1000, 1 << 20).unwrap();
    assert_eq!(m.bytes, (32 << 10) - 1000);
    let m = img.block_status(100 << 10, 1 << 20).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::UnallocatedPlain, 28 << 10));
    // qemu-img rebase issues its requests on these run boundaries.
    let ob = make(&q, &d, "ob.qcow2", "", "1M", &["write -P 1 0 100k"]);
    let ov = d.path("ov.qcow2");
    let (obs, ovs) = (ob.to_str().unwrap(), ov.to_str().unwrap());
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            obs,
            "-F",
            "qcow2",
            ovs,
            "1M",
        ],
    );
    let mut ovl = open(&ov);
    let runs: Vec<(u64, u64)> = (0..4)
        .map(|i| i * 32768)
        .map(|o| (o, ovl.block_status(o, 2 << 20).unwrap().bytes))
        .collect();
    assert_eq!(
        runs,
        [(0, 32768), (32768, 32768), (65536, 32768), (98304, 32768)]
    );
    let out = std::process::Command::new(&q)
        .args(["--trace", "blk_co_pwritev", "rebase", "-b", "", ovs])
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    let writes: Vec<(u64, u64)> = trace
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let o = w.iter().position(|&x| x == "offset")?;
            Some((w[o + 1].parse().ok()?, w[o + 3].parse().ok()?))
        })
        .collect();
    assert_eq!(
        writes,
        [(0, 32768), (32768, 32768), (65536, 32768), (98304, 4096)],
        "{trace}"
    );
    // Over 256 GiB with 64 KiB clusters the L2 cache cannot cover the disk: 4 KiB
    // slices of 512 entries, runs of at most 32 MiB.
    let f = make(
        &q,
        &d,
        "big.qcow2",
        "",
        "300G",
        &[
            "write -P 2 0 64k",
            "write -P 3 31M 2M",
            "write -P 4 299G 64k",
        ],
    );
    let mut img = open(&f);
    assert_eq!(img.l2_slice_entries(), 512);
    let m = img.block_status(64 << 10, 1 << 40).unwrap();
    assert_eq!(
        (m.kind, m.bytes),
        (ClusterKind::UnallocatedPlain, (31 << 20) - (64 << 10))
    );
    let m = img.block_status(31 << 20, 1 << 40).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::Normal, 1 << 20));
    let m = img.block_status(32 << 20, 1 << 40).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::Normal, 1 << 20));
    // Unallocated L2 ranges stop at slice ends too.
    let m = img.block_status(100 << 30, 1 << 40).unwrap();
    assert_eq!((m.kind, m.bytes), (ClusterKind::UnallocatedPlain, 32 << 20));
    let (ours, calls) = our_map(&mut img);
    assert!(calls > 9000);
    assert_eq!(ours, map_layer_qcow2(&q, &f));
    let mut b = vec![0u8; 3 << 20];
    img.read(30 << 20, &mut b).unwrap();
    assert!(b[..1 << 20].iter().all(|&x| x == 0));
    assert!(b[1 << 20..].iter().all(|&x| x == 3));
    // Just under the limit the whole table is one slice.
    let f = make(&q, &d, "edge.qcow2", "", "256G", &[]);
    assert_eq!(open(&f).l2_slice_entries(), 8192);
}

/// Tiny deterministic generator for the corruption tests.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
}

#[test]
fn corrupted_tables_give_errors_not_panics() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("fuzz");
    for (name, opts) in [
        ("std.qcow2", "cluster_size=4k"),
        ("ext.qcow2", "extended_l2=on,cluster_size=16k"),
    ] {
        let f = make(
            &q,
            &d,
            name,
            opts,
            "2M",
            &[
                "write -P 1 0 40k",
                "write -c -P 2 64k 16k",
                "write -z 128k 16k",
                "write -P 3 1M 8k",
            ],
        );
        let (h, dev) = load(&f);
        let img = Qcow2Image::open(dev.clone(), &h).unwrap();
        let cs = h.cluster_size();
        let mut tables = vec![h.l1_table_offset];
        tables.extend(
            img.l1_table()
                .iter()
                .map(|e| e & instar_qcow2::entry::L1E_OFFSET_MASK)
                .filter(|&o| o != 0),
        );
        let mut rng = Lcg(0x5eed ^ cs);
        let mut errors = 0;
        for round in 0..300 {
            let mut data = dev.data.clone();
            let t = tables[round % tables.len()];
            for _ in 0..1 + rng.next() % 8 {
                let pos = (t + rng.next() % cs) as usize;
                data[pos] = rng.next() as u8;
            }
            let mut dev = MemDev::read_only(data);
            let Ok(h) = Header::read(&mut dev, OpenMode::ReadOnly) else {
                continue;
            };
            let mut img = match Qcow2Image::open(dev, &h) {
                Ok(i) => i,
                Err(_) => {
                    errors += 1;
                    continue;
                }
            };
            let size = img.virtual_size();
            let mut buf = vec![0u8; size as usize];
            if img.read(0, &mut buf).is_err() {
                errors += 1;
            }
            let mut off = 0;
            while off < size {
                match img.block_status(off, size - off) {
                    Ok(m) => {
                        assert!(m.bytes > 0 && m.bytes <= size - off);
                        off += m.bytes;
                    }
                    Err(_) => break,
                }
            }
        }
        assert!(errors > 0, "no corruption was detected at all");
    }
}
