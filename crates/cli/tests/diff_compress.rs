//! `rebase -c` against qemu-img 10.2 and 11.1: compressed copies, zlib and zstd.
//!
//! Where every compressed request qemu-img sends is one cluster long, its output is
//! deterministic and instar's file must be byte-identical (`run_safe_case`, which also
//! checks `qemu-img check`, `compare`, `info`, the hole layout and `--output json`).
//! The corpus alternates clusters that differ with clusters that do not, so each run of
//! differing clusters is one cluster; its data covers random (incompressible: written
//! uncompressed), text-like, zero-heavy, single-byte, four-symbol and half-random
//! clusters, at cluster sizes from 512 bytes to 2 MiB, with a partial last cluster.
//!
//! A request of several clusters is compressed by parallel threads in qemu-img and
//! packed in the order they finish, which varies from run to run
//! (`docs/compression.md`): there the files are compared up to that order
//! ([`run_packed_case`]): same length, header, cluster map, `check` counters, `info`,
//! content, and the same compressed bytes for every cluster whose length is known.
//!
//! qemu-img compresses with the system's libraries: the 11.1.3 reference build runs on
//! Debian 13's (zstd 1.5.7, zlib 1.3.1), 10.2.2 and the machine's 10.0.2 on Debian 12's
//! (zstd 1.5.4, zlib 1.2.13). zlib 1.3.1 deflates to 1.2.13's bytes; zstd 1.5.7 does not.
//! instar carries both zstd releases: by default (1.5.7) its zstd files must equal
//! 11.1.3's, and with `INSTAR_ZSTD=1.5.4` 10.2.2's ([`checked_case`]).

mod qemu;
#[path = "qemu/safe.rs"]
mod safe;

use std::path::{Path, PathBuf};

use instar_testkit::rng::Rng;
use qemu::*;
use safe::*;

/// The variable that selects instar's zstd release.
const ZSTD_ENV: &str = "INSTAR_ZSTD";
/// instar as it runs by default: zstd 1.5.7.
const DEFAULT_ZSTD: &[EnvVar] = &[(ZSTD_ENV, None)];
/// instar asked for Debian 12's zstd.
const ZSTD_1_5_4: &[EnvVar] = &[(ZSTD_ENV, Some("1.5.4"))];

/// qemu-img 7.2's rebase has no `-c` (it came with 8.2).
const NO_C_IN_7_2: &[(&str, &str)] = &[("7.2", "rebase -c came with QEMU 8.2")];
/// Against 11.1.3 (zstd 1.5.7), where zstd 1.5.4 compresses the scenario differently.
const ZSTD_1_5_4_DIFFERS: &[(&str, &str)] = &[
    ("7.2", "rebase -c came with QEMU 8.2"),
    ("10.2", "the 10.2.2 build links Debian 12's zstd 1.5.4"),
    ("10.0", "Debian 12's qemu-img links its zstd 1.5.4"),
];

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

/// One cluster of corpus data of kind `k`.
fn cluster_data(rng: &mut Rng, k: u64, cs: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "cluster",
        "of",
        "a",
        "qcow2",
        "image",
        "is",
        "written",
        "compressed",
        "when",
        "rebase",
        "copies",
        "data",
        "from",
        "old",
        "backing",
        "file",
        "into",
        "overlay",
        "zlib",
        "zstd",
        "and",
        "then",
        "header",
        "\n",
    ];
    match k % 6 {
        0 => (0..cs).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut v = Vec::with_capacity(cs + 16);
            while v.len() < cs {
                v.extend_from_slice(rng.pick(WORDS).as_bytes());
                v.push(b' ');
            }
            v.truncate(cs);
            v
        }
        2 => {
            let mut v = vec![0u8; cs];
            for _ in 0..(cs / 512).max(1) {
                let i = rng.below(cs as u64) as usize;
                v[i] = rng.next() as u8;
            }
            v
        }
        3 => vec![(rng.next() as u8) | 1; cs],
        4 => (0..cs).map(|_| *rng.pick(b"ACGT")).collect(),
        // Half the bytes random: compresses a little, near the "does it fit" line for
        // small clusters.
        _ => (0..cs)
            .map(|i| if i % 2 == 0 { rng.next() as u8 } else { 0 })
            .collect(),
    }
}

/// A raw old backing of `n` clusters: even clusters hold data (kinds in turn), odd
/// clusters zeros, so a detach copies single clusters.
fn corpus(fx: &Fx, name: &str, cs: usize, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(cs * n);
    for i in 0..n {
        if i % 2 == 1 {
            out.extend(std::iter::repeat_n(0u8, cs));
        } else {
            out.extend(cluster_data(&mut rng, (i / 2) as u64, cs));
        }
    }
    fx.write(name, &out);
}

/// Detach a `ctype` overlay of cluster size `cs` (and `extra` create options) from a
/// raw corpus backing: 4 MiB at most, 64 clusters at most, 1000 bytes short of a whole
/// cluster at the end.
fn corpus_case(name: &str, ctype: &str, cs: usize, extra: &str) {
    let build = |fx: &Fx| {
        let n = ((4usize << 20) / cs).min(64);
        corpus(fx, "base.raw", cs, n, 0x5eed ^ cs as u64);
        let size = (n * cs - 1000).to_string();
        let mut o = format!("cluster_size={cs}");
        if !ctype.is_empty() {
            o.push_str(&format!(",compression_type={ctype}"));
        }
        if !extra.is_empty() {
            o.push(',');
            o.push_str(extra);
        }
        fx.create(
            "qcow2",
            "ovl.qcow2",
            &size,
            &["-b", "base.raw", "-F", "raw", "-o", &o],
        );
        s(&["-c", "-b", ""])
    };
    // zstd 1.5.7 (the 11.1.3 build's) gives 1.5.4's bytes for this corpus's 2 MiB
    // clusters, and other bytes for smaller ones.
    checked_case(name, &build, ctype == "zstd" && cs < 2 << 20);
}

/// `run_safe_case` against every build. `zstd`: zstd 1.5.4 and 1.5.7 compress the
/// scenario differently, so instar by default (1.5.7) must give 11.1.3's file, and with
/// `INSTAR_ZSTD=1.5.4` that of the Debian 12 builds ([`same_as_debian12_builds`]).
fn checked_case(name: &str, build: &Build, zstd: bool) {
    let mut c = SafeCase::new(name, build);
    c.subject_env = DEFAULT_ZSTD;
    if zstd {
        c.reference = "11.1";
        c.differs = ZSTD_1_5_4_DIFFERS;
    } else {
        c.differs = NO_C_IN_7_2;
    }
    run_safe_case(&c);
    if zstd {
        same_as_debian12_builds(name, build);
    }
}

/// With `INSTAR_ZSTD=1.5.4`, instar's file is byte-identical to those of qemu-img 10.2.2
/// and the machine's 10.0.2 (both on Debian 12's zstd 1.5.4), and clean. The rest of
/// what `run_safe_case` checks does not depend on the zstd release.
fn same_as_debian12_builds(name: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(&format!("{name}-zstd-1.5.4"));
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let mut argv = vec!["rebase".to_string()];
    argv.extend(build(&fx));
    argv.push("ovl.qcow2".into());
    let dir = dense_copy(&scratch, "subject");
    let out = run_env(subject.path(), &argv, &dir, ZSTD_1_5_4);
    assert_eq!(out.status, 0, "{name}: instar: {}", out.stderr);
    let got = bytes_of(&dir.join("ovl.qcow2"));
    if let Some(p) = check_problems(&refs.v10_2, &dir, "ovl.qcow2") {
        panic!("{name}: instar's file (zstd 1.5.4) is not clean: {p}");
    }
    let debian12 = refs
        .all()
        .into_iter()
        .filter(|q| q.label.starts_with("10."));
    for q in debian12 {
        let qdir = dense_copy(&scratch, &format!("qemu-{}", q.label));
        let out = run(&q.img, &argv, &qdir);
        assert_eq!(
            out.status, 0,
            "{name}: qemu-img {}: {}",
            q.label, out.stderr
        );
        let want = bytes_of(&qdir.join("ovl.qcow2"));
        assert!(
            want == got,
            "{name}: with {ZSTD_ENV}=1.5.4, instar's file differs from qemu-img {}'s: {}",
            q.label,
            describe_diff(&want, &got).unwrap_or_default()
        );
    }
}

#[test]
fn zlib_corpus_4k() {
    corpus_case("c-zlib-4k", "zlib", 4096, "");
}

#[test]
fn zlib_corpus_64k() {
    corpus_case("c-zlib-64k", "zlib", 65536, "");
}

#[test]
fn zlib_corpus_2m() {
    corpus_case("c-zlib-2m", "zlib", 2 << 20, "");
}

#[test]
fn zstd_corpus_4k() {
    corpus_case("c-zstd-4k", "zstd", 4096, "");
}

#[test]
fn zstd_corpus_64k() {
    corpus_case("c-zstd-64k", "zstd", 65536, "");
}

#[test]
fn zstd_corpus_2m() {
    corpus_case("c-zstd-2m", "zstd", 2 << 20, "");
}

#[test]
fn small_clusters_zlib_512_and_zstd_1k() {
    corpus_case("c-zlib-512", "zlib", 512, "");
    corpus_case("c-zstd-1k", "zstd", 1024, "");
}

#[test]
fn v2_overlay_is_zlib() {
    corpus_case("c-v2-64k", "", 65536, "compat=0.10");
    corpus_case("c-v2-4k", "", 4096, "compat=0.10");
}

#[test]
fn extended_l2() {
    corpus_case("c-extl2-zlib", "zlib", 65536, "extended_l2=on");
    corpus_case("c-extl2-zstd", "zstd", 32768, "extended_l2=on");
}

#[test]
fn refcount_widths_1_and_64() {
    // 1-bit refcounts: a host cluster holds one compressed cluster (refcount_max is 1).
    corpus_case("c-rc1", "zlib", 65536, "refcount_bits=1");
    corpus_case("c-rc64-zstd", "zstd", 4096, "refcount_bits=64");
}

#[test]
fn lazy_refcounts() {
    corpus_case("c-lazy", "zstd", 65536, "lazy_refcounts=on");
}

#[test]
fn many_refcount_blocks_with_512_byte_clusters() {
    // 2 MiB of 512-byte clusters: new refcount blocks appear while clusters are packed.
    let build = |fx: &Fx| {
        corpus(fx, "base.raw", 512, 4096, 77);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "2M",
            &[
                "-b",
                "base.raw",
                "-F",
                "raw",
                "-o",
                "cluster_size=512,compression_type=zstd,refcount_bits=4",
            ],
        );
        s(&["-c", "-b", ""])
    };
    checked_case("c-refblocks-512", &build, true);
}

#[test]
fn onto_a_new_backing_with_compressed_clusters_already_in_the_overlay() {
    // Old and new backings differ in every other cluster; the overlay already holds
    // compressed clusters (packed by qemu-io) and normal ones.
    let build = |fx: &Fx| {
        corpus(fx, "old.raw", 65536, 64, 9);
        fx.create("qcow2", "new.qcow2", "4M", &[]);
        fx.io("qcow2", "new.qcow2", &["write -P 0 0 4M"]);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "4M",
            &["-b", "old.raw", "-F", "raw", "-o", "compression_type=zstd"],
        );
        fx.io(
            "qcow2",
            "ovl.qcow2",
            &[
                "write -c -P 0x44 0 64k",
                "write -c -P 0x45 256k 64k",
                "write -P 0x46 512k 64k",
                "write -c -P 0x47 1M 64k",
            ],
        );
        s(&["-c", "-b", "new.qcow2", "-F", "qcow2"])
    };
    checked_case("c-existing", &build, true);
}

#[test]
fn overlay_with_a_snapshot_sharing_its_tables() {
    // The L2 tables are shared with an internal snapshot: each is copied on write before
    // the first compressed entry goes in; the packed clusters must not be taken for
    // anything the snapshot still uses.
    let build = |fx: &Fx| {
        corpus(fx, "base.raw", 4096, 1024, 21);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "4M",
            &["-b", "base.raw", "-F", "raw", "-o", "cluster_size=4k"],
        );
        fx.io(
            "qcow2",
            "ovl.qcow2",
            &["write -P 0x44 8k 4k", "write -c -P 0x45 2M 4k"],
        );
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        s(&["-c", "-b", ""])
    };
    checked_case("c-snapshot", &build, false);
}

#[test]
fn incompressible_only() {
    // Every copied cluster is random: none fits in cluster_size - 1 bytes, so all are
    // written as normal clusters (qemu-img's fallback).
    let build = |fx: &Fx| {
        let mut rng = Rng(31);
        let mut data = Vec::new();
        for i in 0..32 {
            if i % 2 == 0 {
                data.extend(cluster_data(&mut rng, 0, 65536));
            } else {
                data.extend(std::iter::repeat_n(0u8, 65536));
            }
        }
        fx.write("base.raw", &data);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "2M",
            &["-b", "base.raw", "-F", "raw", "-o", "compression_type=zstd"],
        );
        s(&["-c", "-b", ""])
    };
    checked_case("c-incompressible", &build, false);
}

// ---------------------------------------------------------------------------------------
// Requests of several clusters: qemu-img's packing order varies.

/// Old chain: a qcow2 base full of corpus data with runs of differing clusters; the
/// rebase goes onto an empty new backing, so most requests are many clusters long.
fn packed_build(fx: &Fx, ctype: &str, cs: usize, extra: &[&str]) -> Vec<String> {
    let n = ((4usize << 20) / cs).min(96);
    let mut rng = Rng(0xbead ^ cs as u64);
    let mut data = Vec::new();
    for i in 0..n {
        data.extend(cluster_data(&mut rng, i as u64, cs));
    }
    fx.write("base.raw", &data);
    fx.img(&["convert", "-O", "qcow2", "base.raw", "base.qcow2"]);
    fx.create("qcow2", "new.qcow2", &(n * cs).to_string(), &[]);
    let o = format!("cluster_size={cs},compression_type={ctype}");
    fx.create(
        "qcow2",
        "ovl.qcow2",
        &(n * cs).to_string(),
        &["-b", "base.qcow2", "-F", "qcow2", "-o", &o],
    );
    fx.io("qcow2", "ovl.qcow2", extra);
    s(&["-c", "-b", "new.qcow2", "-F", "qcow2"])
}

#[test]
fn packed_runs_zlib_64k() {
    run_packed_case("p-zlib-64k", false, &|fx| {
        packed_build(fx, "zlib", 65536, &["write -P 0x61 128k 64k"])
    });
}

#[test]
fn packed_runs_zstd_4k() {
    run_packed_case("p-zstd-4k", true, &|fx| {
        packed_build(fx, "zstd", 4096, &["write -c -P 0x62 8k 4k"])
    });
}

#[test]
fn packed_runs_zstd_detach() {
    run_packed_case("p-zstd-detach", true, &|fx| {
        let mut o = packed_build(fx, "zstd", 16384, &["write -P 0x63 0 16k"]);
        o.truncate(1);
        o.extend(s(&["-b", ""]));
        o
    });
}

/// Compressed clusters of a qcow2 file: guest offset → (host offset, sector span).
fn compressed_entries(path: &Path) -> Vec<(u64, u64, u64)> {
    let b = std::fs::read(path).expect("read image");
    let cb = be32(&b, 20);
    let cs = 1u64 << cb;
    let l1_size = be32(&b, 36) as usize;
    let l1 = be64(&b, 40) as usize;
    let ext = be32(&b, 4) >= 3 && be64(&b, 72) & 16 != 0;
    let es: u64 = if ext { 16 } else { 8 };
    let shift = 62 - (cb - 8);
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = be64(&b, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            continue;
        }
        for j in 0..cs / es {
            let e = be64(&b, (l2 + j * es) as usize);
            if e >> 62 & 1 == 1 {
                let host = e & ((1u64 << shift) - 1);
                let sectors = ((e >> shift) & ((1u64 << (cb - 8)) - 1)) + 1;
                let span = sectors * 512 - host % 512;
                out.push(((i as u64 * (cs / es) + j) * cs, host, span));
            }
        }
    }
    out
}

/// Exact compressed length of each cluster where the packing shows it: a cluster
/// followed directly (in host order) by another that starts inside its sector span.
fn known_lengths(entries: &[(u64, u64, u64)]) -> std::collections::BTreeMap<u64, u64> {
    let mut by_host: Vec<_> = entries.to_vec();
    by_host.sort_by_key(|e| e.1);
    let mut m = std::collections::BTreeMap::new();
    for w in by_host.windows(2) {
        let ((g, h, span), (_, next, _)) = (w[0], w[1]);
        if next > h && next < h + span {
            m.insert(g, next - h);
        }
    }
    m
}

/// `qemu-img map --output=json` of the overlay's own layer without host offsets (they
/// follow the packing order): which guest ranges are data, zero, compressed.
fn map_without_offsets(q: &Qemu, dir: &Path, name: &str) -> String {
    let text = layer_map_text(q, dir, name);
    let v: serde_json::Value = serde_json::from_str(&text).expect("map JSON");
    let mut out = String::new();
    for e in v.as_array().expect("map array") {
        let mut e = e.clone();
        if let Some(o) = e.as_object_mut() {
            o.remove("offset");
        }
        out.push_str(&format!("{e}\n"));
    }
    out
}

/// `qemu-img check --output=json` counters that do not depend on the packing order.
fn check_counters(q: &Qemu, dir: &Path, name: &str) -> String {
    let out = run(&q.img, &["check", "--output=json", name], dir);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("check JSON");
    [
        "check-errors",
        "allocated-clusters",
        "compressed-clusters",
        "total-clusters",
    ]
    .iter()
    .map(|k| format!("{k}={}\n", v[*k]))
    .collect()
}

/// Differences between two `-c` results that may differ only in packing order: the
/// order in which clusters were packed also moves the uncompressed (did-not-shrink)
/// clusters and the tables allocated between them, so lengths and offsets may differ;
/// what may not is which clusters are compressed, their compressed bytes, the counters
/// and the header.
fn packed_differences(q: &Qemu, want: (&Path, &str), got: (&Path, &str)) -> Vec<String> {
    let mut d = Vec::new();
    let (a, b) = (
        std::fs::read(want.0.join(want.1)).expect("read"),
        std::fs::read(got.0.join(got.1)).expect("read"),
    );
    let cs = 1usize << be32(&a, 20);
    if a.get(..cs) != b.get(..cs) {
        d.push("header cluster differs".into());
    }
    let (ma, mb) = (
        map_without_offsets(q, want.0, want.1),
        map_without_offsets(q, got.0, got.1),
    );
    if ma != mb {
        d.push(format!("map differs:\n{}", line_diff(&ma, &mb)));
    }
    let (ca, cb) = (
        check_counters(q, want.0, want.1),
        check_counters(q, got.0, got.1),
    );
    if ca != cb {
        d.push(format!("check counters differ:\n{}", line_diff(&ca, &cb)));
    }
    // The same compressed bytes for every cluster whose exact length one file shows.
    let (ea, eb) = (
        compressed_entries(&want.0.join(want.1)),
        compressed_entries(&got.0.join(got.1)),
    );
    let guest = |e: &[(u64, u64, u64)]| e.iter().map(|x| x.0).collect::<Vec<_>>();
    if guest(&ea) != guest(&eb) {
        d.push("different clusters are compressed".into());
        return d;
    }
    let (la, lb) = (known_lengths(&ea), known_lengths(&eb));
    let mut compared = 0;
    for (x, y) in ea.iter().zip(&eb) {
        let Some(&len) = la.get(&x.0).or_else(|| lb.get(&x.0)) else {
            continue;
        };
        let (ha, hb, len) = (x.1 as usize, y.1 as usize, len as usize);
        if a.get(ha..ha + len) != b.get(hb..hb + len) {
            d.push(format!(
                "compressed bytes of guest cluster {:#x} differ",
                x.0
            ));
        }
        compared += 1;
    }
    assert!(
        ea.len() < 4 || compared > 0,
        "no compressed length is known in either file: the scenario compares nothing"
    );
    d
}

/// A scenario whose requests span several clusters: instar against qemu-img, up to
/// packing order; instar's own file must be sound, unchanged in content and
/// deterministic. zlib: 10.2 and 11.1 against instar as it runs by default. zstd
/// (`zstd`): 11.1 (zstd 1.5.7) against instar by default, 10.2 (zstd 1.5.4) against
/// instar with `INSTAR_ZSTD=1.5.4`.
fn run_packed_case(name: &str, zstd: bool, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let opts = build(&fx);
    let mut argv = vec!["rebase".to_string()];
    argv.extend(opts.iter().cloned());
    argv.push("ovl.qcow2".into());
    let plan: &[(&str, &[EnvVar], &[&str])] = if zstd {
        &[
            ("default", DEFAULT_ZSTD, &["11.1"]),
            ("zstd-1.5.4", ZSTD_1_5_4, &["10.2"]),
        ]
    } else {
        &[("default", DEFAULT_ZSTD, &["10.2", "11.1"])]
    };
    let mut failures = Vec::new();
    for (tag, env, labels) in plan {
        let mut results = Vec::new();
        for label in *labels {
            let Some(q) = refs.all().into_iter().find(|q| q.label == *label) else {
                need(
                    false,
                    "INSTAR_REQUIRE_QEMU",
                    &format!("qemu-img {label} missing"),
                );
                continue;
            };
            let dir = dense_copy(&scratch, &format!("qemu-{label}"));
            let out = run(&q.img, &argv, &dir);
            assert_eq!(out.status, 0, "qemu-img {label}: {}", out.stderr);
            results.push((*label, dir));
        }
        let mut mine = Vec::new();
        for round in 0..2 {
            let dir = dense_copy(&scratch, &format!("subject-{tag}-{round}"));
            let out = run_env(subject.path(), &argv, &dir, env);
            assert_eq!(out.status, 0, "instar ({tag}): {}", out.stderr);
            mine.push(dir);
        }
        for f in packed_failures(&refs.v10_2, &scratch, &mine, &results) {
            failures.push(format!("instar ({tag}): {f}"));
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

/// What is wrong with instar's two runs `mine` of a packed scenario, compared with
/// qemu-img's `results` (build label, directory).
fn packed_failures(
    q10: &Qemu,
    scratch: &Scratch,
    mine: &[PathBuf],
    results: &[(&str, PathBuf)],
) -> Vec<String> {
    let mut failures = Vec::new();
    let bytes = |d: &Path| std::fs::read(d.join("ovl.qcow2")).expect("read");
    if bytes(&mine[0]) != bytes(&mine[1]) {
        failures.push("instar's output differs between two runs".to_string());
    }
    let got = &mine[0];
    if let Some(p) = check_problems(q10, got, "ovl.qcow2") {
        failures.push(format!("qemu-img check of instar's file: {p}"));
    }
    let label = got.file_name().expect("dir").to_string_lossy();
    if let Err(e) = compare(
        q10,
        scratch.root(),
        "fixture/ovl.qcow2",
        &format!("{label}/ovl.qcow2"),
    ) {
        failures.push(format!("content changed: {e}"));
    }
    for (qlabel, dir) in results {
        if let Some(p) = check_problems(q10, dir, "ovl.qcow2") {
            panic!("qemu-img {qlabel}'s own result is not clean: {p}");
        }
        if bytes(dir) == bytes(got) {
            continue;
        }
        for d in packed_differences(q10, (dir, "ovl.qcow2"), (got, "ovl.qcow2")) {
            failures.push(format!("against qemu-img {qlabel}: {d}"));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------
// -u -c and formats without compression

fn overlay_pair(fx: &Fx, fmt: &str) {
    fx.create("qcow2", "base.qcow2", "4M", &[]);
    fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    fx.create("qcow2", "new.qcow2", "4M", &[]);
    fx.create(fmt, "ovl.img", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
}

/// Run qemu-img 10.2, 11.1 and instar with `opts` on copies of the fixture; returns
/// (exit, stderr with the program name replaced, overlay bytes) of each.
fn each_tool(name: &str, fmt: &str, opts: &[&str]) -> Vec<(String, i32, String, Vec<u8>)> {
    let Some((refs, subject)) = setup() else {
        return Vec::new();
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    overlay_pair(&fx, fmt);
    let mut argv = vec!["rebase"];
    argv.extend_from_slice(opts);
    argv.push("ovl.img");
    let mut tools: Vec<(String, &Path)> = vec![("10.2".into(), refs.v10_2.img.as_path())];
    if let Some(n) = refs.newest() {
        tools.push(("11.1".into(), n.img.as_path()));
    }
    tools.push(("instar".into(), subject.path()));
    let mut out = Vec::new();
    for (label, prog) in tools {
        let dir = dense_copy(&scratch, &label);
        let o = run(prog, &argv, &dir);
        let stderr = o
            .stderr
            .replace("qemu-img:", "PROG:")
            .replace("instar:", "PROG:");
        out.push((label, o.status, stderr, bytes_of(&dir.join("ovl.img"))));
    }
    out
}

fn bytes_of(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read overlay")
}

#[test]
fn unsafe_with_c_is_a_plain_unsafe_rebase() {
    let r = each_tool(
        "c-unsafe",
        "qcow2",
        &["-u", "-q", "-c", "-b", "new.qcow2", "-F", "qcow2"],
    );
    for (label, status, stderr, bytes) in &r[1..] {
        assert_eq!(
            (*status, stderr.as_str(), bytes),
            (r[0].1, r[0].2.as_str(), &r[0].3),
            "{label} differs from qemu-img 10.2"
        );
    }
    if let Some(first) = r.first() {
        assert_eq!(first.1, 0, "qemu-img -u -c failed: {}", first.2);
    }
}

#[test]
fn qed_refuses_compression_safe_and_unsafe() {
    for (name, opts) in [
        ("c-qed-safe", &["-c", "-b", "new.qcow2", "-F", "qcow2"][..]),
        (
            "c-qed-unsafe",
            &["-u", "-c", "-b", "new.qcow2", "-F", "qcow2"][..],
        ),
    ] {
        let r = each_tool(name, "qed", opts);
        for (label, status, stderr, bytes) in &r {
            assert_eq!(*status, 1, "{name}: {label}");
            assert_eq!(
                stderr, "PROG: Compression not supported for this file format\n",
                "{name}: {label}"
            );
            assert_eq!(bytes, &r[0].3, "{name}: {label} changed the overlay");
        }
    }
}

#[test]
fn external_data_file_fails_like_qemu() {
    // qemu-img's first compressed write into an image with an external data file fails
    // with ENOTSUP; instar gives the same message before writing anything.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("c-data-file");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    corpus(&fx, "base.raw", 65536, 16, 3);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-o", "data_file=ovl.data", "-b", "base.raw", "-F", "raw"],
    );
    let argv = ["rebase", "-c", "-b", "", "ovl.qcow2"];
    let mut tools: Vec<(&str, &Path)> = vec![("10.2", refs.v10_2.img.as_path())];
    if let Some(n) = refs.newest() {
        tools.push(("11.1", n.img.as_path()));
    }
    tools.push(("instar", subject.path()));
    for (label, prog) in tools {
        let dir = dense_copy(&scratch, label);
        let before = snapshot(&dir);
        let o = run(prog, &argv, &dir);
        let stderr = o
            .stderr
            .replace("qemu-img:", "PROG:")
            .replace("instar:", "PROG:");
        assert_eq!(
            (o.status, stderr.as_str()),
            (
                1,
                "PROG: Error while writing to COW image: Operation not supported\n"
            ),
            "{label}"
        );
        if label == "instar" {
            assert!(snapshot(&dir) == before, "instar changed a file");
        }
    }
}

#[test]
fn partly_allocated_extended_l2_cluster_is_refused_where_qemu_aborts() {
    // Widened to whole clusters, a request covers a cluster whose first subcluster the
    // overlay allocates: qemu-img's assertion fails (SIGABRT, the file already written
    // up to there); instar refuses before writing anything.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("c-extl2-partial");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    corpus(&fx, "base.raw", 65536, 16, 4);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-o", "extended_l2=on", "-b", "base.raw", "-F", "raw"],
    );
    fx.io("qcow2", "ovl.qcow2", &["write -P 0x44 0 2k"]);
    let argv = ["rebase", "-c", "-b", "", "ovl.qcow2"];
    let dir = dense_copy(&scratch, "qemu-10.2");
    let o = run(&refs.v10_2.img, &argv, &dir);
    assert!(
        o.status != 0 && o.stderr.contains("Assertion"),
        "qemu-img 10.2 no longer aborts here: exit {}, {}",
        o.status,
        o.stderr
    );
    let dir = dense_copy(&scratch, "subject");
    let before = snapshot(&dir);
    let o = run(subject.path(), &argv, &dir);
    assert_eq!(o.status, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("partly allocated"),
        "instar's message: {}",
        o.stderr
    );
    assert!(snapshot(&dir) == before, "instar changed a file");
}

#[test]
fn dirty_overlay_is_repaired_then_compressed() {
    // Lazy refcounts and a qemu-io killed before its refcounts reached the file: the
    // open repairs the image (same stderr lines as qemu-img), then the -c copy.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("c-dirty");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    corpus(&fx, "base.raw", 65536, 32, 12);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "2M",
        &["-o", "lazy_refcounts=on", "-b", "base.raw", "-F", "raw"],
    );
    let args = [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x35 128k 64k",
        "-c",
        "sigraise 9",
        "ovl.qcow2",
    ];
    run(&refs.v10_2.io, &args, &fx.dir);
    assert_eq!(fx.read("ovl.qcow2")[79] & 1, 1, "the fixture must be dirty");
    let argv = ["rebase", "-c", "-b", "", "ovl.qcow2"];
    let mut tools: Vec<(&str, &Path)> = vec![("10.2", refs.v10_2.img.as_path())];
    if let Some(n) = refs.newest() {
        tools.push(("11.1", n.img.as_path()));
    }
    tools.push(("instar", subject.path()));
    let mut results = Vec::new();
    for (label, prog) in tools {
        let dir = dense_copy(&scratch, label);
        let o = run(prog, &argv, &dir);
        assert_eq!(o.status, 0, "{label}: {}", o.stderr);
        let stderr = o
            .stderr
            .replace("qemu-img:", "PROG:")
            .replace("instar:", "PROG:");
        if let Some(p) = check_problems(&refs.v10_2, &dir, "ovl.qcow2") {
            panic!("{label}: not clean: {p}");
        }
        results.push((label, stderr, bytes_of(&dir.join("ovl.qcow2"))));
    }
    assert!(
        results[0].1.contains("Repairing"),
        "qemu-img repaired nothing: {}",
        results[0].1
    );
    for (label, stderr, bytes) in &results[1..] {
        assert_eq!(stderr, &results[0].1, "{label}: stderr");
        assert!(
            bytes == &results[0].2,
            "{label}: file differs from qemu-img 10.2's: {}",
            describe_diff(&results[0].2, bytes).unwrap_or_default()
        );
    }
}
