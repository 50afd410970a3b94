//! The writer against qemu-io: the same writes to copies of one qed image give the
//! same file, byte for byte (once the need-check bit is cleared, as QEMU's close
//! does), with and without a backing file, across cluster and table sizes.

use std::path::Path;

use instar_blockdev::{BlockDev, IoError, MemDev};
use instar_qed::header::F_NEED_CHECK;
use instar_qed::{Below, ClusterState, QedImage, Writer};
use instar_testkit::{qemu_img, qio, run, Scratch};

/// The backing file: raw bytes, zeros past its end.
struct Raw(Vec<u8>);

impl Below for Raw {
    fn read_below(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.0.get(o + i))
                .copied()
                .unwrap_or(0);
        }
        Ok(())
    }
}

enum W {
    Data(u8, u64, u64),
    Zero(u64, u64),
}

const K: u64 = 1024;

fn writes(cs: u64) -> Vec<W> {
    vec![
        W::Data(0x11, 0, 64 * K),
        // Partial cluster: the rest comes from the backing file (or zeros).
        W::Data(0x22, 100 * K, 10 * K),
        // Whole clusters: zero clusters (L2 entry 1).
        W::Zero(256 * K, 128 * K),
        // Data into zero clusters: allocated again.
        W::Data(0x66, 256 * K + cs, cs),
        // Partial zero write: zero data.
        W::Zero(400 * K + 512, 4 * K),
        // Several clusters, partial at both ends, maybe across an L2 table.
        W::Data(0x33, 4000 * K, 300 * K),
        // In place, on an allocated cluster.
        W::Data(0x44, 100 * K, 4 * K),
        // Zeroes over allocated clusters: written in place.
        W::Zero(0, 64 * K),
        // The last, partial cluster of the image.
        W::Data(0x55, 8 * 1024 * K - 8 * K, 8 * K),
    ]
}

fn qemu_cmd(w: &W) -> String {
    match *w {
        W::Data(p, o, l) => format!("write -P {p:#x} {o} {l}"),
        W::Zero(o, l) => format!("write -z {o} {l}"),
    }
}

fn case(q: &Path, cluster_size: u64, table_size: u32, with_backing: bool) {
    let d = Scratch::new("qedw");
    let base = d.path("base.raw");
    let mut base_bytes = vec![0u8; 6 << 20];
    for (i, b) in base_bytes.iter_mut().enumerate() {
        *b = (i / 4096) as u8 | 1;
    }
    std::fs::write(&base, &base_bytes).unwrap();
    let img = d.path("a.qed");
    let opts = format!("cluster_size={cluster_size},table_size={table_size}");
    let mut args = vec!["create", "-q", "-f", "qed", "-o", &opts];
    if with_backing {
        args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
    }
    let path = img.to_str().unwrap().to_string();
    args.extend_from_slice(&[&path, "8M"]);
    run(q, &args);
    let before = std::fs::read(&img).unwrap();

    let ws = writes(cluster_size);
    let cmds: Vec<String> = ws.iter().map(qemu_cmd).collect();
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qio(q, "qed", &img, &cmd_refs);
    let want = std::fs::read(&img).unwrap();

    let image = QedImage::open(MemDev::new(before)).unwrap();
    let mut writer = Writer::new(image, with_backing);
    let mut below = Raw(base_bytes);
    for w in &ws {
        let below = with_backing.then_some(&mut below as &mut dyn Below);
        match *w {
            W::Data(p, o, l) => writer.write(o, &vec![p; l as usize], below).unwrap(),
            W::Zero(o, l) => writer.write_zeroes(o, l, below).unwrap(),
        }
    }
    let mut image = writer.finish();
    let mut header = *image.header();
    assert_eq!(
        header.need_check(),
        !with_backing,
        "need-check is set by an allocation without a backing file"
    );
    header.features &= !F_NEED_CHECK;
    image.dev_mut().write_at(0, &header.to_bytes()).unwrap();
    let got = image.into_dev().data;
    assert_eq!(got.len(), want.len(), "file length");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("first difference at {i:#x}");
    }
}

#[test]
fn writes_match_qemu_io() {
    let Some(q) = qemu_img() else { return };
    for (cs, ts) in [(65536, 4), (4096, 2), (4096, 16), (16384, 1 << 3)] {
        case(&q, cs, ts, false);
        case(&q, cs, ts, true);
    }
}

#[test]
fn lookups_match_qemu_map() {
    let Some(q) = qemu_img() else { return };
    let d = Scratch::new("qedmap");
    let img = d.path("m.qed");
    let path = img.to_str().unwrap();
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096,table_size=2",
            path,
            "16M",
        ],
    );
    qio(
        &q,
        "qed",
        &img,
        &[
            "write 0 8k",
            "write -z 64k 64k",
            "write 5M 12k",
            "write 4092k 8k",
        ],
    );
    let mut image = QedImage::open(MemDev::new(std::fs::read(&img).unwrap())).unwrap();
    let mut pos = 0;
    let mut seen = Vec::new();
    while pos < image.virtual_size() {
        let (state, n) = image.find_cluster(pos, image.virtual_size() - pos).unwrap();
        assert!(n > 0);
        let kind = match state {
            ClusterState::Found(_) => "data",
            ClusterState::Zero => "zero",
            _ => "none",
        };
        match seen.last_mut() {
            Some((_, len, k)) if *k == kind => *len += n,
            _ => seen.push((pos, n, kind)),
        }
        pos += n;
    }
    let want: Vec<(u64, u64, &str)> = vec![
        (0, 8 * K, "data"),
        (8 * K, 56 * K, "none"),
        (64 * K, 64 * K, "zero"),
        (128 * K, 4092 * K - 128 * K, "none"),
        (4092 * K, 8 * K, "data"),
        (4100 * K, 5 * 1024 * K - 4100 * K, "none"),
        (5 * 1024 * K, 12 * K, "data"),
        (5 * 1024 * K + 12 * K, 11 * 1024 * K - 12 * K, "none"),
    ];
    assert_eq!(seen, want);
}
