//! The qcow2 writer against real QEMU: the same request list is applied by `qemu-io`
//! (one session) to one copy of an image and by [`Writer`] to another, and the files must
//! match byte for byte, in length, and in their data/hole map; `qemu-img check` must
//! find nothing wrong with the writer's output.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use instar_blockdev::{IoError, MemDev};
use instar_qcow2::header::{Header, OpenMode};
use instar_qcow2::writer::{Below, Finish, IoOp, Writer};

use instar_testkit::qemu_ref;
use instar_testkit::sparse::{data_extents, zero_range};
use instar_testkit::{Rng, Scratch};

use qemu_ref::Build as Qemu;

/// qemu-img and qemu-io 10.2; `None` skips the test, unless `INSTAR_REQUIRE_QEMU=1`.
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

#[derive(Debug, Clone)]
enum Req {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
}

impl Req {
    fn qemu_io(&self) -> String {
        match *self {
            Req::Write { off, len, pat } => format!("write -P {pat:#x} {off} {len}"),
            Req::Zero { off, len } => format!("write -z {off} {len}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    compat: &'static str,
    cluster_size: u64,
    refcount_bits: u32,
    extended_l2: bool,
    lazy_refcounts: bool,
    size: u64,
    /// Raw backing file with this many bytes of pattern 0x11.
    backing: Option<u64>,
    /// Requests applied by qemu-io before the snapshot (and before copying).
    setup: Vec<Req>,
    snapshot: bool,
    reqs: Vec<Req>,
}

impl Scenario {
    fn new(
        name: &str,
        compat: &'static str,
        cluster_size: u64,
        refcount_bits: u32,
        size: u64,
    ) -> Self {
        Scenario {
            name: name.into(),
            compat,
            cluster_size,
            refcount_bits,
            extended_l2: false,
            lazy_refcounts: false,
            size,
            backing: None,
            setup: vec![],
            snapshot: false,
            reqs: vec![],
        }
    }
}

struct RawBacking(Vec<u8>);

impl Below for RawBacking {
    fn read_below(&mut self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.0.get(off as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }
}

/// The data extents of `p` as `start-end` in hex, space-separated.
fn data_map(p: &Path) -> String {
    let extents: Vec<String> = data_extents(p)
        .iter()
        .map(|(d, h)| format!("{d:x}-{h:x}"))
        .collect();
    extents.join(" ")
}

/// Copy `src` to `dst` keeping exactly the source's data/hole map.
fn sparse_copy(src: &Path, dst: &Path) {
    let bytes = fs::read(src).unwrap();
    let f = fs::File::create(dst).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (s, e) in data_extents(src) {
        let (s, e) = (s as usize, (e as usize).min(bytes.len()));
        f.write_all_at(&bytes[s..e], s as u64).unwrap();
    }
    f.sync_all().unwrap();
}

fn qemu_io_session(q: &Qemu, img: &Path, reqs: &[Req]) {
    if reqs.is_empty() {
        return;
    }
    let mut c = Command::new(&q.io);
    // The rebase opens the overlay without discard passthrough.
    c.args(["-f", "qcow2", "-d", "ignore"]);
    for r in reqs {
        c.arg("-c").arg(r.qemu_io());
    }
    c.arg(img);
    let out = run(&mut c);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}

/// Run one scenario; panics with a description of the first difference.
fn check(q: &Qemu, sc: &Scenario) -> (Header, Finish) {
    let dir = Scratch::new(&sc.name);
    let img = dir.join("img.qcow2");
    let mut backing_bytes = None;
    let mut c = Command::new(&q.img);
    c.args(["create", "-q", "-f", "qcow2", "-o"]);
    c.arg(format!(
        "compat={},cluster_size={},refcount_bits={},extended_l2={},lazy_refcounts={}",
        sc.compat,
        sc.cluster_size,
        sc.refcount_bits,
        if sc.extended_l2 { "on" } else { "off" },
        if sc.lazy_refcounts { "on" } else { "off" }
    ));
    if let Some(n) = sc.backing {
        let base = dir.join("base.raw");
        let bytes = vec![0x11u8; n as usize];
        fs::write(&base, &bytes).unwrap();
        backing_bytes = Some(bytes);
        c.args(["-b", "base.raw", "-F", "raw"]);
    }
    c.arg(&img).arg(sc.size.to_string());
    run(&mut c);
    qemu_io_session(q, &img, &sc.setup);
    if sc.snapshot {
        run(Command::new(&q.img)
            .args(["snapshot", "-c", "snap1"])
            .arg(&img));
    }
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    sparse_copy(&img, &a);
    sparse_copy(&img, &b);
    assert_eq!(
        data_map(&img),
        data_map(&b),
        "{}: cp changed the hole map",
        sc.name
    );

    // QEMU.
    qemu_io_session(q, &a, &sc.reqs);

    // Writer.
    let mut dev = MemDev::new(fs::read(&b).unwrap());
    let hdr = Header::read(&mut dev, OpenMode::ReadWrite).unwrap();
    let (dev, log, fin) = match backing_bytes {
        Some(bytes) => {
            let mut w = Writer::open_with_backing(dev, &hdr, RawBacking(bytes)).unwrap();
            apply(&mut w, &sc.reqs, &sc.name);
            let log = w.io_log().to_vec();
            let (d, fin) = w.finish().unwrap();
            (d, log, fin)
        }
        None => {
            let mut w = Writer::open(dev, &hdr, false).unwrap();
            apply(&mut w, &sc.reqs, &sc.name);
            let log = w.io_log().to_vec();
            let (d, fin) = w.finish().unwrap();
            (d, log, fin)
        }
    };
    assert_eq!(fin.incompatible_features, hdr.incompatible_features);
    let mut log = log;
    // finish() may have written more.
    log.extend(
        dev.writes[log.iter().filter(|o| !matches!(o, IoOp::Flush)).count()..]
            .iter()
            .map(|&(o, l)| IoOp::Write {
                offset: o,
                len: l as u64,
            }),
    );

    // Replay the writer's device operations onto the sparse copy, so the file system
    // sees the same write pattern.
    {
        let f = fs::OpenOptions::new().write(true).open(&b).unwrap();
        for op in &log {
            match *op {
                IoOp::Write { offset, len } => {
                    let s = offset as usize;
                    f.write_all_at(&dev.data[s..s + len as usize], offset)
                        .unwrap();
                }
                IoOp::ZeroRange { offset, len } => zero_range(&f, offset, len),
                IoOp::Flush => {}
            }
        }
        f.sync_all().unwrap();
    }
    let qa = fs::read(&a).unwrap();
    let qb = fs::read(&b).unwrap();
    assert_eq!(
        qb, dev.data,
        "{}: replay differs from the in-memory result",
        sc.name
    );
    if qa != dev.data {
        let first = qa.iter().zip(dev.data.iter()).position(|(x, y)| x != y);
        panic!(
            "{}: files differ (qemu {} bytes, writer {} bytes, first difference at {:?}) in {}",
            sc.name,
            qa.len(),
            dev.data.len(),
            first.map(|p| format!("{p:#x}")),
            dir.display()
        );
    }
    let (ma, mb) = (data_map(&a), data_map(&b));
    assert_eq!(
        ma,
        mb,
        "{}: data/hole maps differ in {}",
        sc.name,
        dir.display()
    );
    let out = run(Command::new(&q.img).args(["check", "-f", "qcow2"]).arg(&b));
    assert!(
        out.contains("No errors were found"),
        "{}: qemu-img check: {out}",
        sc.name
    );
    assert!(
        !out.contains("leaked"),
        "{}: qemu-img check: {out}",
        sc.name
    );
    let _ = fs::remove_dir_all(&dir);
    (hdr, fin)
}

fn apply<B: Below>(w: &mut Writer<MemDev, B>, reqs: &[Req], name: &str) {
    for r in reqs {
        match *r {
            Req::Write { off, len, pat } => w
                .write(off, &vec![pat; len as usize])
                .unwrap_or_else(|e| panic!("{name}: {r:?}: {e}")),
            Req::Zero { off, len } => w
                .write_zeroes(off, len)
                .unwrap_or_else(|e| panic!("{name}: {r:?}: {e}")),
        }
    }
}

fn w(off: u64, len: u64, pat: u8) -> Req {
    Req::Write { off, len, pat }
}
fn z(off: u64, len: u64) -> Req {
    Req::Zero { off, len }
}

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

#[test]
fn writer_fresh_64k() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("fresh64k", "1.1", 64 * K, 16, 64 * M);
    s.reqs = vec![
        w(0, 128 * K, 0x55),
        z(M, 64 * K),
        w(3 * M, 64 * K, 0x66),
        w(64 * K, 64 * K, 0x77),
    ];
    check(&q, &s);
}

#[test]
fn writer_small_clusters_refblocks_and_reftable_growth() {
    let Some(q) = qemu() else { return };
    for bits in [16u32, 64] {
        let mut s = Scenario::new(&format!("grow512-{bits}"), "1.1", 512, bits, 64 * M);
        s.reqs = vec![
            w(0, 64 * K, 1),
            w(64 * K, M, 2),
            w(4 * M, 3 * M, 3),
            z(16 * M, M),
            w(20 * M, 2 * M, 4),
        ];
        check(&q, &s);
    }
    // Worked examples D and the second growth: the reftable moves twice.
    let mut s = Scenario::new("grow512-8M", "1.1", 512, 16, 64 * M);
    s.reqs = vec![w(0, 8 * M, 1)];
    let (h, fin) = check(&q, &s);
    assert_eq!(
        (h.refcount_table_offset, fin.refcount_table_offset),
        (512, 0x820200)
    );
    assert_eq!(fin.refcount_table_clusters, 2);
    let mut s = Scenario::new("grow512-24M", "1.1", 512, 16, 64 * M);
    s.reqs = vec![
        w(0, 64 * K, 1),
        w(64 * K, 8 * M, 2),
        w(8 * M + 64 * K, 16 * M, 3),
    ];
    let (_, fin) = check(&q, &s);
    assert_eq!(fin.refcount_table_clusters, 4);
    // Worked example E: the retried L2 allocation lands in the freed old reftable.
    let mut s = Scenario::new("l2-in-old-reftable", "1.1", 512, 16, 64 * M);
    s.reqs = vec![w(0, 7864320, 1)];
    for k in 0..344 {
        s.reqs.push(w(16 * M + k * 32 * K, 512, 2));
    }
    check(&q, &s);
}

#[test]
fn writer_refcount_widths() {
    let Some(q) = qemu() else { return };
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let mut s = Scenario::new(&format!("rc{bits}"), "1.1", 4 * K, bits, 32 * M);
        s.reqs = vec![
            w(0, 256 * K, 1),
            w(M, 2 * M, 2),
            z(4 * M, 64 * K),
            w(8 * M, 4 * K, 3),
        ];
        check(&q, &s);
    }
}

#[test]
fn writer_v2_zeroes() {
    let Some(q) = qemu() else { return };
    let reqs = vec![
        w(0, 128 * K, 1),
        z(64 * K, 192 * K),
        z(M, M),
        w(2 * M, 64 * K, 2),
    ];
    let mut s = Scenario::new("v2-nobacking", "0.10", 64 * K, 16, 64 * M);
    s.reqs = reqs.clone();
    check(&q, &s);
    let mut s = Scenario::new("v2-backing", "0.10", 64 * K, 16, 64 * M);
    s.backing = Some(3 * M);
    s.reqs = reqs;
    check(&q, &s);
}

#[test]
fn writer_v3_zeroes_zero_alloc() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("v3zero", "1.1", 64 * K, 16, 64 * M);
    s.reqs = vec![
        w(0, 128 * K, 1),
        z(64 * K, 192 * K),
        z(M, M),
        w(64 * K, 64 * K, 2),
        w(2 * M, 64 * K, 3),
    ];
    check(&q, &s);
    let mut s = Scenario::new("v3zero-backing", "1.1", 64 * K, 16, 64 * M);
    s.backing = Some(2 * M);
    s.reqs = vec![z(0, 4 * M), w(64 * K, 64 * K, 2)];
    check(&q, &s);
}

#[test]
fn writer_extended_l2() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("extl2", "1.1", 64 * K, 16, 64 * M);
    s.extended_l2 = true;
    s.reqs = vec![
        w(0, 2 * K, 1),
        w(6 * K, 2 * K, 2),
        w(64 * K, 64 * K, 3),
        z(256 * K, 4 * K),
        w(258 * K, 2 * K, 4),
        z(512 * K, 64 * K),
        z(2 * K, 2 * K),
        w(M + 62 * K, 6 * K, 5),
    ];
    check(&q, &s);
}

#[test]
fn writer_unaligned_disk_end() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("oddsize", "1.1", 64 * K, 16, 100 * K);
    s.reqs = vec![w(64 * K, 36 * K, 7)];
    check(&q, &s);
    let mut s = Scenario::new("oddsize-backing", "1.1", 64 * K, 16, 100 * K);
    s.backing = Some(128 * K);
    s.reqs = vec![w(64 * K, 36 * K, 7)];
    check(&q, &s);
    let mut s = Scenario::new("oddsize-v2-zero", "0.10", 64 * K, 16, M + 36 * K);
    s.backing = Some(M);
    s.reqs = vec![z(0, M + 36 * K)];
    check(&q, &s);
    let mut s = Scenario::new("oddsize-extl2", "1.1", 64 * K, 16, M + 3 * K);
    s.extended_l2 = true;
    s.reqs = vec![w(M, 3 * K, 1), z(0, 64 * K)];
    check(&q, &s);
}

#[test]
fn writer_l2_slices() {
    let Some(q) = qemu() else { return };
    // 300 GiB with 64 KiB clusters: the L2 cache uses 4 KiB slices.
    let mut s = Scenario::new("slices", "1.1", 64 * K, 16, 300 << 30);
    s.reqs = vec![
        w(0, 64 * K, 1),
        w(30 * M, 4 * M, 2),
        w(200 << 30, 64 * M, 3),
        z(100 << 30, 64 * M),
    ];
    check(&q, &s);
    let mut s = Scenario::new("slices-extl2", "1.1", 64 * K, 16, 300 << 30);
    s.extended_l2 = true;
    s.reqs = vec![w(15 * M, 2 * M, 2), z(16 * M - 2 * K, 4 * K)];
    check(&q, &s);
}

#[test]
fn writer_two_mib_clusters() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("c2m", "1.1", 2 * M, 16, 64 * M);
    s.reqs = vec![w(0, 2 * M, 1), z(4 * M, 2 * M), w(10 * M, 4 * M, 2)];
    check(&q, &s);
}

#[test]
fn writer_internal_snapshot() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("snap", "1.1", 64 * K, 16, 64 * M);
    s.setup = vec![w(0, 256 * K, 1), w(M, 64 * K, 2)];
    s.snapshot = true;
    s.reqs = vec![
        w(64 * K, 64 * K, 3),
        w(512 * K, 64 * K, 4),
        w(M, 64 * K, 5),
        z(128 * K, 64 * K),
        w(0, 128 * K, 6),
    ];
    check(&q, &s);
    let mut s = Scenario::new("snap-extl2", "1.1", 64 * K, 16, 64 * M);
    s.extended_l2 = true;
    s.setup = vec![w(0, 2 * K, 1), w(8 * K, 4 * K, 1), w(M, 64 * K, 2)];
    s.snapshot = true;
    s.reqs = vec![
        w(4 * K, 2 * K, 3),
        w(M + 2 * K, 2 * K, 4),
        z(M + 8 * K, 2 * K),
    ];
    check(&q, &s);
    let mut s = Scenario::new("snap-v2-512", "0.10", 512, 16, 8 * M);
    s.setup = vec![w(0, 256 * K, 1)];
    s.snapshot = true;
    s.reqs = vec![w(0, 64 * K, 3), w(M, M, 4), z(128 * K, 64 * K)];
    check(&q, &s);
}

#[test]
fn writer_lazy_refcounts() {
    let Some(q) = qemu() else { return };
    let mut s = Scenario::new("lazy", "1.1", 64 * K, 16, 64 * M);
    s.lazy_refcounts = true;
    s.reqs = vec![w(0, 128 * K, 1), z(M, 64 * K), w(2 * M, 64 * K, 2)];
    check(&q, &s);
}

fn random_scenario(seed: u64) -> Scenario {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let v3 = r.below(4) != 0;
    let ext = v3 && r.below(3) == 0;
    let cs = if ext {
        [16 * K, 32 * K, 64 * K][r.below(3) as usize]
    } else {
        [512, 512, 4 * K, 64 * K][r.below(4) as usize]
    };
    let bits = [1u32, 2, 4, 8, 16, 16, 32, 64][r.below(8) as usize];
    // v2 images only have 16-bit refcounts.
    let bits = if v3 { bits } else { 16 };
    let unit = if ext { cs / 32 } else { cs };
    let clusters = 64 + r.below(if cs == 512 { 8192 } else { 512 });
    let mut size = clusters * cs;
    if cs > 512 && r.below(4) == 0 {
        size -= 512 * (1 + r.below(cs / 512 - 1));
    }
    let name = format!("rand{seed}");
    let mut s = Scenario::new(&name, if v3 { "1.1" } else { "0.10" }, cs, bits, size);
    s.extended_l2 = ext;
    s.lazy_refcounts = v3 && r.below(5) == 0;
    if r.below(3) == 0 {
        s.backing = Some(r.below(size / 512 + 1) * 512);
    }
    let units = size.div_ceil(unit);
    let gen = |r: &mut Rng, n: usize| -> Vec<Req> {
        let mut v = vec![];
        for _ in 0..n {
            let start = r.below(units);
            let max_len = (units - start).min(if cs == 512 { 4096 } else { 64 });
            let len_units = 1 + r.below(max_len);
            let off = start * unit;
            let len = (len_units * unit).min(size - off);
            if r.below(3) == 0 {
                v.push(z(off, len));
            } else {
                v.push(w(off, len, 1 + r.below(250) as u8));
            }
        }
        v
    };
    if bits > 1 && r.below(4) == 0 {
        let n = 1 + r.below(4) as usize;
        s.setup = gen(&mut r, n);
        s.snapshot = true;
    }
    let n = 1 + r.below(12) as usize;
    s.reqs = gen(&mut r, n);
    s
}

#[test]
fn writer_random_sessions() {
    let Some(q) = qemu() else { return };
    let n: u64 = std::env::var("INSTAR_WRITER_RANDOM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut failures = vec![];
    for seed in 1..=n {
        let sc = random_scenario(seed);
        let res = std::panic::catch_unwind(|| check(&q, &sc));
        if let Err(e) = res {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("seed {seed} {sc:?}: {msg}"));
        }
    }
    let mut err = std::io::stderr();
    for f in &failures {
        let _ = writeln!(err, "{f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} random cases failed",
        failures.len()
    );
}

/// A device that keeps every write's bytes, to rebuild the file as it was after any
/// prefix of the writer's operations.
struct Journal {
    inner: MemDev,
    writes: Vec<(u64, Vec<u8>)>,
}

impl instar_blockdev::BlockDev for Journal {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        self.writes.push((offset, buf.to_vec()));
        self.inner.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

/// Stopping after any single device write must leave an image `qemu-img check` accepts
/// (leaked clusters allowed, exit code 3; corruption not).
#[test]
fn writer_crash_consistency() {
    let Some(q) = qemu() else { return };
    type Case = (&'static str, &'static str, u32, Vec<Req>, Vec<Req>);
    let cases: [Case; 2] = [
        (
            "crash-v3",
            "1.1",
            64,
            vec![w(0, 64 * K, 1)],
            vec![
                w(0, 4 * K, 2),
                w(M, 2 * M, 3),
                z(32 * K, 8 * K),
                w(6 * M, 2 * K, 4),
            ],
        ),
        (
            "crash-v2",
            "0.10",
            16,
            vec![w(0, 64 * K, 1)],
            vec![
                w(M, 64 * K, 3),
                z(0, 128 * K),
                z(M, 32 * K),
                w(2 * M, 8 * K, 5),
            ],
        ),
    ];
    for (name, compat, bits, setup, reqs) in cases {
        let dir = Scratch::new(name);
        let img = dir.join("img.qcow2");
        run(Command::new(&q.img)
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!(
                "compat={compat},cluster_size=512,refcount_bits={bits}"
            ))
            .arg(&img)
            .arg((8 * M).to_string()));
        qemu_io_session(&q, &img, &setup);
        run(Command::new(&q.img).args(["snapshot", "-c", "s"]).arg(&img));
        let orig = fs::read(&img).unwrap();
        let mut dev = Journal {
            inner: MemDev::new(orig.clone()),
            writes: vec![],
        };
        let hdr = Header::read(&mut dev, OpenMode::ReadWrite).unwrap();
        let mut wr = Writer::open(dev, &hdr, false).unwrap();
        for r in &reqs {
            match *r {
                Req::Write { off, len, pat } => wr.write(off, &vec![pat; len as usize]).unwrap(),
                Req::Zero { off, len } => wr.write_zeroes(off, len).unwrap(),
            }
        }
        let (dev, _) = wr.finish().unwrap();
        assert!(
            dev.writes.len() > 20,
            "{name}: too few writes to be meaningful"
        );
        let crashed = dir.join("crashed.qcow2");
        let mut state = orig;
        for (i, (off, bytes)) in dev.writes.iter().enumerate() {
            let end = *off as usize + bytes.len();
            if state.len() < end {
                state.resize(end, 0);
            }
            state[*off as usize..end].copy_from_slice(bytes);
            fs::write(&crashed, &state).unwrap();
            let out = Command::new(&q.img)
                .args(["check", "-f", "qcow2"])
                .arg(&crashed)
                .output()
                .unwrap();
            let code = out.status.code();
            assert!(
                code == Some(0) || code == Some(3),
                "{name}: after write {i} of {} ({off:#x}+{:#x}) qemu-img check says {code:?}: {}",
                dev.writes.len(),
                bytes.len(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
