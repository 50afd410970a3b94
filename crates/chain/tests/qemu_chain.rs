//! Chain reads and allocation against real QEMU: content equals `qemu-img convert`
//! of the top image, `is_allocated_above` agrees with `qemu-img map` of the chain,
//! `is_allocated` of the top with `qemu-img map` of the top alone.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use instar_blockdev::MemDev;
use instar_chain::layer::Layer;
use instar_chain::raw::RawImage;
use instar_chain::view::ChainView;
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::{Header, OpenMode};
use instar_vmdk::VmdkImage;

fn layer(file: &Path) -> Box<dyn Layer> {
    let mut dev = MemDev::read_only(std::fs::read(file).unwrap());
    let name = file.to_str().unwrap();
    if name.ends_with(".qcow2") {
        let h = Header::read(&mut dev, OpenMode::ReadOnly).unwrap();
        Box::new(Qcow2Image::open(dev, &h).unwrap())
    } else if name.ends_with(".vmdk") {
        Box::new(VmdkImage::open(dev).unwrap())
    } else {
        Box::new(RawImage::new(dev))
    }
}

fn view(files: &[PathBuf]) -> ChainView<'static> {
    ChainView::new(files.iter().map(|f| layer(f)).collect())
}

/// (start, length, allocating layer) runs, merged.
fn push(v: &mut Vec<(u64, u64, Option<usize>)>, start: u64, len: u64, l: Option<usize>) {
    if let Some(last) = v.last_mut() {
        if last.0 + last.1 == start && last.2 == l {
            last.1 += len;
            return;
        }
    }
    v.push((start, len, l));
}

fn check_chain(q: &Path, files: &[PathBuf], d: &Scratch) {
    let mut v = view(files);
    let expect = convert_raw(q, &files[0], d);
    assert_eq!(v.virtual_size(), expect.len() as u64);
    let mut got = vec![0xeeu8; expect.len()];
    v.read(0, &mut got).unwrap();
    assert!(
        got == expect,
        "chain content differs for {}",
        files[0].display()
    );
    for &(o, l) in &[(3u64, 100_000usize), (1 << 20, 70_000), (3 << 20, 4097)] {
        if o + l as u64 <= expect.len() as u64 {
            let mut b = vec![0u8; l];
            v.read(o, &mut b).unwrap();
            assert_eq!(b, expect[o as usize..o as usize + l]);
        }
    }
    // Whole-chain allocation, against qemu-img map of the chain. map stops at a short
    // layer's end with "zero, not present" at the layer above it; is_allocated_above
    // counts those zeros as allocated in the short layer.
    let n = files.len();
    let mut theirs = Vec::new();
    for e in parse_map(&run(
        q,
        &["map", "--output=json", files[0].to_str().unwrap()],
    )) {
        let d = e.depth as usize;
        let l = if e.present {
            Some(d)
        } else if d + 1 < n {
            Some(d + 1)
        } else {
            None
        };
        push(&mut theirs, e.start, e.length, l);
    }
    let size = v.virtual_size();
    let mut ours = Vec::new();
    let mut off = 0;
    while off < size {
        let a = v
            .is_allocated_above(0, None, off, (2 << 20).min(size - off))
            .unwrap();
        assert!(a.bytes > 0);
        push(&mut ours, off, a.bytes, a.layer);
        off += a.bytes;
    }
    assert_eq!(
        ours,
        theirs,
        "allocation differs for {}",
        files[0].display()
    );
    // The top layer alone.
    if files[0].to_str().unwrap().ends_with(".qcow2") {
        let mut theirs = Vec::new();
        for e in map_layer_qcow2(q, &files[0]) {
            push(&mut theirs, e.start, e.length, e.present.then_some(0));
        }
        let mut ours = Vec::new();
        let mut off = 0;
        while off < size {
            let (a, n) = v.is_allocated(0, off, size - off).unwrap();
            push(&mut ours, off, n, a.then_some(0));
            off += n;
        }
        assert_eq!(ours, theirs);
    }
}

fn create(
    q: &Path,
    f: &Path,
    fmt: &str,
    backing: Option<(&Path, &str)>,
    size: &str,
    cmds: &[&str],
) {
    let fs = f.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", fmt];
    let b;
    if let Some((bf, bfmt)) = backing {
        b = bf.to_str().unwrap().to_string();
        args.extend(["-b", b.as_str(), "-F", bfmt]);
    }
    args.extend([fs, size]);
    run(q, &args);
    if !cmds.is_empty() {
        qio(q, fmt, f, cmds);
    }
}

#[test]
fn qcow2_chain_of_three_with_short_middle() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("chain3");
    let (base, mid, top) = (
        d.path("base.qcow2"),
        d.path("mid.qcow2"),
        d.path("top.qcow2"),
    );
    create(
        &q,
        &base,
        "qcow2",
        None,
        "6M",
        &[
            "write -P 1 0 1M",
            "write -P 9 5M 1M",
            "write -c -P 8 1M 64k",
        ],
    );
    create(
        &q,
        &mid,
        "qcow2",
        Some((&base, "qcow2")),
        "3M",
        &[
            "write -P 2 512k 64k",
            "write -z 640k 64k",
            "write -P 4 2900k 100k",
        ],
    );
    create(
        &q,
        &top,
        "qcow2",
        Some((&mid, "qcow2")),
        "8M",
        &["write -P 3 0 64k", "write -z 700k 4k", "write -P 5 6M 8k"],
    );
    let files = [top.clone(), mid.clone(), base.clone()];
    check_chain(&q, &files, &d);
    // In-chain search stopping above the base (prefix chain): top and mid only.
    let mut v = view(&files);
    let a = v.is_allocated_above(0, Some(2), 64 << 10, 2 << 20).unwrap();
    assert_eq!((a.layer, a.bytes), (None, (512 - 64) << 10));
    let a = v.is_allocated_above(0, Some(2), 3 << 20, 2 << 20).unwrap();
    assert_eq!((a.layer, a.bytes), (Some(1), 2 << 20));
    let a = v.is_allocated_above(1, Some(2), 8 << 20, 1).unwrap();
    assert_eq!((a.layer, a.bytes), (None, 0));
    // Backing longer than the overlay, v2 layers, extended L2 on top.
    let (b2, t2) = (d.path("b2.qcow2"), d.path("t2.qcow2"));
    create(&q, &b2, "qcow2", None, "4M", &["write -P 6 0 4M"]);
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            b2.to_str().unwrap(),
            "-F",
            "qcow2",
            d.path("m2.qcow2").to_str().unwrap(),
            "3M",
        ],
    );
    qio(&q, "qcow2", &d.path("m2.qcow2"), &["write -P 7 1M 64k"]);
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            d.path("m2.qcow2").to_str().unwrap(),
            "-F",
            "qcow2",
            t2.to_str().unwrap(),
            "2M",
        ],
    );
    qio(
        &q,
        "qcow2",
        &t2,
        &["write -P 8 2k 2k", "write -z 1032k 4k", "discard 100k 2k"],
    );
    check_chain(&q, &[t2, d.path("m2.qcow2"), b2], &d);
}

#[test]
fn raw_and_vmdk_backings() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("rawvmdk");
    // A raw base of an odd length: QEMU rounds it up to whole sectors.
    let raw = d.path("base.raw");
    let mut bytes = vec![0u8; 300_000];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 253) as u8 + 1;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let top = d.path("top.qcow2");
    create(
        &q,
        &top,
        "qcow2",
        Some((&raw, "raw")),
        "1M",
        &["write -P 3 64k 64k"],
    );
    assert_eq!(layer(&raw).virtual_size(), 300_032);
    check_chain(&q, &[top.clone(), raw.clone()], &d);
    // vmdk under vmdk, and a qcow2 on top of the vmdk pair.
    let (vb, vo, qt) = (d.path("vb.vmdk"), d.path("vo.vmdk"), d.path("qt.qcow2"));
    create(&q, &vb, "vmdk", None, "4M", &["write -P 1 0 2M"]);
    create(
        &q,
        &vo,
        "vmdk",
        Some((&vb, "vmdk")),
        "4M",
        &["write -P 2 1M 64k", "write -P 4 3M 4k"],
    );
    let o = VmdkImage::open(MemDev::read_only(std::fs::read(&vo).unwrap())).unwrap();
    let b = VmdkImage::open(MemDev::read_only(std::fs::read(&vb).unwrap())).unwrap();
    assert_eq!(o.descriptor().parent_cid, b.descriptor().cid);
    assert_eq!(
        o.descriptor().parent_file_name_hint.as_deref(),
        Some(vb.to_str().unwrap().as_bytes())
    );
    check_chain(&q, &[vo.clone(), vb.clone()], &d);
    create(
        &q,
        &qt,
        "qcow2",
        Some((&vo, "vmdk")),
        "6M",
        &["write -P 5 0 64k", "write -z 1M 64k"],
    );
    check_chain(&q, &[qt, vo, vb], &d);
}
