//! Persistent bitmaps against real QEMU, without the sandbox: images made with
//! `qemu-img bitmap` load as `qemu-img info` lists their bitmaps, and a qemu-io session
//! (which opens the image read-write, writes, and stores the bitmaps on close) gives
//! the same file as the writer doing the same: the open's IN_USE update, the same
//! requests with the enabled bitmaps dirtied, the close's store.

use std::path::Path;
use std::process::Command;

use instar_blockdev::{BlockDev, MemDev};
use instar_qcow2::bitmaps::{BitmapSet, Dirt, FLAG_AUTO, FLAG_IN_USE};
use instar_qcow2::writer::Writer;
use instar_qcow2::{Header, OpenMode};
use instar_testkit::qemu_ref::{self, Build as Qemu};
use instar_testkit::Scratch;

fn qemu() -> Option<Qemu> {
    qemu_ref::need(qemu_ref::REFERENCE)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn img(q: &Qemu, args: &[&str]) -> String {
    run(Command::new(&q.img).args(args))
}

/// A 4 MiB qcow2 image with `cluster_size` clusters and bitmaps of various kinds.
fn fixture(q: &Qemu, file: &Path, cluster_size: &str) {
    let f = file.to_str().expect("utf-8 path");
    img(
        q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster_size}"),
            f,
            "4M",
        ],
    );
    img(q, &["bitmap", "--add", f, "auto"]);
    img(q, &["bitmap", "--add", "-g", "512", f, "fine"]);
    img(q, &["bitmap", "--add", "-g", "1M", f, "off"]);
    run(Command::new(&q.io).args(["-c", "write -P 1 100k 8k", "-c", "write -z 2M 64k", f]));
    img(q, &["bitmap", "--disable", f, "off"]);
    img(q, &["bitmap", "--add", f, "empty"]);
}

fn load(bytes: Vec<u8>) -> (Header, MemDev, BitmapSet) {
    let mut dev = MemDev::new(bytes);
    let h = Header::read(&mut dev, OpenMode::ReadWrite).expect("header");
    let set = BitmapSet::load(&mut dev, &h)
        .expect("bitmaps")
        .expect("some bitmaps");
    (h, dev, set)
}

#[test]
fn load_matches_qemu_img_info() {
    let Some(q) = qemu() else { return };
    let s = Scratch::new("bitmaps-info");
    let file = s.path("a.qcow2");
    fixture(&q, &file, "64k");
    let info = img(&q, &["info", "--output=json", file.to_str().expect("path")]);
    let (_, _, set) = load(std::fs::read(&file).expect("read"));
    // `qemu-img info` lists each bitmap's flags, name and granularity in directory order.
    let mut at = 0;
    for e in &set.entries {
        let name = format!("\"name\": \"{}\"", String::from_utf8_lossy(&e.name));
        let found = info[at..]
            .find(&name)
            .map(|i| at + i)
            .expect("bitmap listed in order");
        let block = &info[info[..found].rfind('{').expect("entry")..];
        let block = &block[..block.find('}').expect("entry end")];
        assert!(block.contains(&format!("\"granularity\": {}", 1u64 << e.granularity_bits)));
        assert_eq!(
            block.contains("\"auto\""),
            e.flags & FLAG_AUTO != 0,
            "{block}"
        );
        assert_eq!(
            block.contains("\"in-use\""),
            e.flags & FLAG_IN_USE != 0,
            "{block}"
        );
        at = found;
    }
    assert_eq!(set.entries.len(), 4);
}

/// qemu-io's session and the writer's give the same file.
fn same_as_qemu_io(cluster_size: &str, requests: &[(u64, u64, Option<u8>)]) {
    let Some(q) = qemu() else { return };
    let s = Scratch::new(&format!("bitmaps-io-{cluster_size}"));
    let file = s.path("a.qcow2");
    fixture(&q, &file, cluster_size);
    let original = std::fs::read(&file).expect("read");

    let mut cmd = Command::new(&q.io);
    for &(off, len, pat) in requests {
        cmd.arg("-c").arg(match pat {
            Some(p) => format!("write -P {p} {off} {len}"),
            None => format!("write -z {off} {len}"),
        });
    }
    run(cmd.arg(&file));
    let want = std::fs::read(&file).expect("read");

    let (mut header, dev, set) = load(original);
    let opened = header.clone();
    let mut w = Writer::open(dev, &header, false).expect("open");
    w.bitmaps_open(&set, &opened).expect("open bitmaps");
    for &(off, len, pat) in requests {
        match pat {
            Some(p) => w.write(off, &vec![p; len as usize]).expect("write"),
            None => w.write_zeroes(off, len).expect("zeroes"),
        }
    }
    let dirt = Dirt::from_requests(requests.iter().map(|&(o, l, _)| (o, l)));
    w.bitmaps_close(&set, &dirt, &mut header).expect("store");
    let (mut dev, fin) = w.finish().expect("finish");
    if fin.header_rewrite_needed {
        header.incompatible_features = fin.incompatible_features;
        let cluster = header.rebuild().expect("rebuild");
        dev.write_at(0, &cluster).expect("header");
    }
    let mut got = vec![0u8; dev.size() as usize];
    dev.read_at(0, &mut got).expect("read back");
    // qemu-io punches the freed bitmap data clusters; both read as zeros.
    assert_eq!(got.len(), want.len(), "file length");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("first difference at {i:#x}");
    }
}

#[test]
fn store_matches_qemu_io_64k() {
    same_as_qemu_io(
        "64k",
        &[
            (0, 4096, Some(7)),
            (3 << 20, 65536, None),
            (700 << 10, 512, Some(9)),
        ],
    );
}

#[test]
fn store_matches_qemu_io_512() {
    same_as_qemu_io(
        "512",
        &[
            (512, 1024, Some(3)),
            (1 << 20, 300 << 10, Some(4)),
            (4190208, 4096, None),
        ],
    );
}
