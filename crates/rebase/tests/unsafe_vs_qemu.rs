//! `qemu-img rebase -u` against instar's guest logic, byte for byte.
//!
//! Each case builds a fixture with qemu-img (and hand-edited bytes where qemu-img
//! cannot make it), copies it twice, runs the reference qemu-img on one copy and
//! `instar_rebase::handle` on the other, and requires identical files, and identical
//! error text when both refuse. Every installed reference version is tried.

mod common;

use std::path::Path;

use common::*;
use instar_abi::{Format, NewBacking, RebaseRequest, Request, Response};

const KIB64: usize = 65536;

/// How a case builds `ovl.qcow2` in its directory (qemu-img 10.2 is passed in).
type Make = fn(&Path, &Path);

struct Case {
    name: &'static str,
    make: Make,
    /// `-b` (empty detaches) and `-F`.
    backing: &'static str,
    format: Option<&'static str>,
    /// `-f` for the overlay.
    overlay_format: Format,
    /// Compare only with qemu-img 10.x (7.2 differs on purpose here).
    only_10: bool,
}

const fn case(
    name: &'static str,
    make: Make,
    backing: &'static str,
    format: Option<&'static str>,
) -> Case {
    Case {
        name,
        make,
        backing,
        format,
        overlay_format: Format::Qcow2,
        only_10: false,
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = read(path);
    if data.len() < offset + bytes.len() {
        data.resize(offset + bytes.len(), 0);
    }
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

fn be32_at(path: &Path, offset: usize) -> u32 {
    u32::from_be_bytes(read(path)[offset..offset + 4].try_into().unwrap())
}

fn be64_at(path: &Path, offset: usize) -> u64 {
    u64::from_be_bytes(read(path)[offset..offset + 8].try_into().unwrap())
}

fn or_be64(path: &Path, offset: usize, bits: u64) {
    let v = be64_at(path, offset) | bits;
    patch(path, offset, &v.to_be_bytes());
}

fn create(dir: &Path, q: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["ovl.qcow2", size]);
    ok(dir, q, &args);
}

/// A 1 MiB image with `opts`, pointing at `old.qcow2` (format qcow2).
fn with_backing(dir: &Path, q: &Path, opts: &str) {
    create(dir, q, opts, "1M");
    ok(
        dir,
        q,
        &[
            "rebase",
            "-u",
            "-b",
            "old.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
    );
}

/// Lay out cluster 0 by hand: the fixed header of the image as created, a chosen
/// `header_length` (with a byte pattern as unknown header fields past 112), the given
/// extensions, the end marker, then an optional backing name; the rest zero.
fn hand_layout(
    path: &Path,
    header_length: u32,
    exts: &[(u32, &[u8])],
    backing: Option<&[u8]>,
    cluster: usize,
) {
    let mut data = read(path);
    let version = u32::from_be_bytes(data[4..8].try_into().unwrap());
    let fixed = if version == 2 { 72 } else { 104 };
    let mut c0 = vec![0u8; cluster];
    c0[..fixed].copy_from_slice(&data[..fixed]);
    let mut pos = if version == 2 {
        72
    } else {
        header_length as usize
    };
    if version == 3 {
        c0[100..104].copy_from_slice(&header_length.to_be_bytes());
        if header_length > 104 {
            c0[104] = data[104];
        }
        for (i, b) in c0[112.min(pos)..pos].iter_mut().enumerate() {
            *b = 0xa0 + i as u8;
        }
    }
    for (magic, body) in exts {
        c0[pos..pos + 4].copy_from_slice(&magic.to_be_bytes());
        c0[pos + 4..pos + 8].copy_from_slice(&(body.len() as u32).to_be_bytes());
        c0[pos + 8..pos + 8 + body.len()].copy_from_slice(body);
        pos += 8 + body.len().next_multiple_of(8);
    }
    pos += 8;
    c0[8..20].fill(0);
    if let Some(name) = backing {
        c0[pos..pos + name.len()].copy_from_slice(name);
        c0[8..16].copy_from_slice(&(pos as u64).to_be_bytes());
        c0[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    data[..cluster].copy_from_slice(&c0);
    std::fs::write(path, data).unwrap();
}

const UNKNOWN_A: u32 = 0x1111_0001;
const UNKNOWN_B: u32 = 0x2222_0002;
const UNKNOWN_C: u32 = 0x3333_0003;
const BFMT: u32 = 0xe279_2aca;

fn three_unknown(dir: &Path, q: &Path, header_length: u32) {
    create(dir, q, "", "1M");
    hand_layout(
        &dir.join("ovl.qcow2"),
        header_length,
        &[
            (UNKNOWN_A, b"alpha"),
            (BFMT, b"qcow2"),
            (UNKNOWN_B, &[7u8; 31]),
            (UNKNOWN_C, b"12345678"),
        ],
        Some(b"old.qcow2"),
        KIB64,
    );
}

fn run_case(c: &Case) {
    let Some(qemus) = all_qemu_imgs() else { return };
    let q10 = &qemus[0].img;
    // One fixture (made by 10.2), copied for each build.
    let fixture = Scratch::new(c.name);
    (c.make)(&fixture, q10);
    for build in &qemus {
        if c.only_10 && qemu_ref::matches(&build.version, "7.2") {
            continue;
        }
        let q = &build.img;
        let dir = Scratch::copy_of(&fixture, c.name);
        std::fs::copy(dir.join("ovl.qcow2"), dir.join("q.qcow2")).unwrap();
        std::fs::copy(dir.join("ovl.qcow2"), dir.join("i.qcow2")).unwrap();
        let before = read(&dir.join("ovl.qcow2"));

        let mut args = vec![
            "rebase",
            "-u",
            "-f",
            c.overlay_format.name(),
            "-b",
            c.backing,
        ];
        if let Some(f) = c.format {
            args.extend(["-F", f]);
        }
        args.push("q.qcow2");
        let (q_ok, q_err) = run(&dir, q, &args);

        let request = Request::Rebase(RebaseRequest {
            overlay_format: c.overlay_format,
            unsafe_mode: true,
            new_backing: Some(NewBacking {
                name: c.backing.as_bytes().to_vec(),
                format: c.format.map(|f| f.as_bytes().to_vec()),
            }),
            old_chain: vec![],
            new_chain: vec![],
            in_chain: None,
            data_file_checked: true,
            progress: false,
            compress: false,
            keys: Vec::new(),
            zstd: Default::default(),
        });
        let resp = run_guest(&dir.join("i.qcow2"), request);
        let who = format!("{} with {}", c.name, q.display());
        match resp {
            Response::Rebase(_) => {
                assert!(q_ok, "{who}: instar succeeded, qemu-img failed: {q_err}")
            }
            Response::Error(e) => {
                assert!(!q_ok, "{who}: qemu-img succeeded, instar failed: {e:?}");
                let ours = qemu_style(&e, "q.qcow2", c.backing);
                assert_eq!(ours.trim_end(), q_err.trim_end(), "{who}: messages differ");
                assert_eq!(
                    read(&dir.join("i.qcow2")),
                    before,
                    "{who}: instar changed a refused image"
                );
            }
            other => panic!("{who}: unexpected response {other:?}"),
        }
        assert!(
            read(&dir.join("q.qcow2")) == read(&dir.join("i.qcow2")),
            "{who}: files differ (see {})",
            dir.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

macro_rules! cases {
    ($($test:ident => $case:expr;)*) => {
        $(
            #[test]
            fn $test() {
                run_case(&$case);
            }
        )*
    };
}

fn plain_1m(dir: &Path, q: &Path) {
    create(dir, q, "", "1M");
}
fn backed_64k(dir: &Path, q: &Path) {
    with_backing(dir, q, "");
}
fn backed_v2(dir: &Path, q: &Path) {
    with_backing(dir, q, "compat=0.10");
}
fn backed_512(dir: &Path, q: &Path) {
    with_backing(dir, q, "cluster_size=512");
}
fn backed_4k(dir: &Path, q: &Path) {
    with_backing(dir, q, "cluster_size=4096");
}
fn backed_2m(dir: &Path, q: &Path) {
    with_backing(dir, q, "cluster_size=2M");
}
fn backed_extl2(dir: &Path, q: &Path) {
    with_backing(dir, q, "extended_l2=on");
}
fn backed_zstd(dir: &Path, q: &Path) {
    with_backing(dir, q, "compression_type=zstd");
}
fn backed_lazy(dir: &Path, q: &Path) {
    with_backing(dir, q, "lazy_refcounts=on");
}
/// Dirty but consistent: QEMU's repair on open finds nothing, rewrites the header
/// with the bit cleared, then rebases.
fn backed_lazy_dirty(dir: &Path, q: &Path) {
    with_backing(dir, q, "lazy_refcounts=on");
    or_be64(&dir.join("ovl.qcow2"), 72, 1);
}
fn backed_refcount1(dir: &Path, q: &Path) {
    with_backing(dir, q, "refcount_bits=1");
}
fn with_snapshot(dir: &Path, q: &Path) {
    create(dir, q, "", "1M");
    ok(dir, q, &["snapshot", "-c", "snap one", "ovl.qcow2"]);
    ok(
        dir,
        q,
        &[
            "rebase",
            "-u",
            "-b",
            "old.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
    );
}
fn data_file(dir: &Path, q: &Path) {
    create(dir, q, "data_file=ovl.data", "1M");
}
fn data_file_raw(dir: &Path, q: &Path) {
    create(dir, q, "data_file=ovl.data,data_file_raw=on", "1M");
}
fn unknown_exts_112(dir: &Path, q: &Path) {
    three_unknown(dir, q, 112);
}
fn unknown_exts_104(dir: &Path, q: &Path) {
    three_unknown(dir, q, 104);
}
fn unknown_exts_120(dir: &Path, q: &Path) {
    three_unknown(dir, q, 120);
}
fn v2_unknown_ext(dir: &Path, q: &Path) {
    create(dir, q, "compat=0.10", "1M");
    hand_layout(
        &dir.join("ovl.qcow2"),
        72,
        &[(UNKNOWN_A, b"v2 ext")],
        Some(b"old"),
        KIB64,
    );
}
fn odd_size(dir: &Path, q: &Path) {
    with_backing(dir, q, "");
    patch(
        &dir.join("ovl.qcow2"),
        24,
        &(1048576u64 + 1000).to_be_bytes(),
    );
}
fn unknown_autoclear(dir: &Path, q: &Path) {
    with_backing(dir, q, "");
    or_be64(&dir.join("ovl.qcow2"), 88, 0x8000_0000_0000_0004);
}
fn garbage_after_name(dir: &Path, q: &Path) {
    with_backing(dir, q, "");
    patch(
        &dir.join("ovl.qcow2"),
        60000,
        b"garbage that a rewrite wipes",
    );
}
fn bfmt_with_nul(dir: &Path, q: &Path) {
    create(dir, q, "", "1M");
    hand_layout(
        &dir.join("ovl.qcow2"),
        112,
        &[(BFMT, b"raw\0junk")],
        Some(b"old\0tail"),
        KIB64,
    );
}
fn own_feature_table(dir: &Path, q: &Path) {
    create(dir, q, "", "1M");
    let mut table = vec![0u8; 96];
    table[1] = 50;
    table[2..12].copy_from_slice(b"my feature");
    table[48] = 1;
    table[49] = 3;
    table[50..55].copy_from_slice(b"other");
    hand_layout(
        &dir.join("ovl.qcow2"),
        112,
        &[(0x6803_f857, &table)],
        Some(b"old"),
        KIB64,
    );
}
fn name_ends_at_cluster_end(dir: &Path, q: &Path) {
    create(dir, q, "cluster_size=512", "1M");
    // 512 - 112 - 8 = 392 bytes of name: the old name fills the cluster to its last byte.
    hand_layout(&dir.join("ovl.qcow2"), 112, &[], Some(&[b'n'; 392]), 512);
}

fn long(n: usize) -> &'static str {
    Box::leak("b".repeat(n).into_boxed_str())
}

cases! {
    rename => case("rename", backed_64k, "new/base.qcow2", Some("qcow2"));
    same_name_is_identity => case("same", backed_64k, "old.qcow2", Some("qcow2"));
    detach => case("detach", backed_64k, "", None);
    detach_with_format_ignored => case("detach-f", backed_64k, "", Some("qcow2"));
    detach_without_backing => case("detach-none", plain_1m, "", None);
    attach_to_plain => case("attach", plain_1m, "base.qcow2", Some("qcow2"));
    relative_path => case("relative", backed_64k, "../other/dir/base.qcow2", Some("qcow2"));
    format_raw => case("raw-fmt", backed_64k, "base.img", Some("raw"));
    format_other_driver => case("host-device", backed_64k, "/dev/sda", Some("host_device"));
    missing_format => case("no-fmt", backed_64k, "base.qcow2", None);
    v2_rename => case("v2", backed_v2, "new.qcow2", Some("qcow2"));
    v2_detach => case("v2-detach", backed_v2, "", None);
    cluster_512_fits => case("c512-376", backed_512, long(376), Some("qcow2"));
    cluster_512_does_not_fit => case("c512-377", backed_512, long(377), Some("qcow2"));
    cluster_512_name_1023 => case("c512-1023", backed_512, long(1023), Some("qcow2"));
    name_1024 => case("n1024", backed_64k, long(1024), Some("qcow2"));
    name_1024_no_format => case("n1024-nof", backed_64k, long(1024), None);
    name_1023_64k => case("n1023", backed_64k, long(1023), Some("raw"));
    cluster_4k_no_feature_table => case("c4k", backed_4k, "new.qcow2", Some("qcow2"));
    cluster_2m => case("c2m", backed_2m, "new.qcow2", Some("qcow2"));
    extended_l2 => case("extl2", backed_extl2, "new.qcow2", Some("qcow2"));
    zstd => case("zstd", backed_zstd, "new.qcow2", Some("qcow2"));
    lazy_refcounts_clean => case("lazy", backed_lazy, "new.qcow2", Some("qcow2"));
    lazy_refcounts_dirty => case("lazy-dirty", backed_lazy_dirty, "new.qcow2", Some("qcow2"));
    refcount_bits_1 => case("rc1", backed_refcount1, "new.qcow2", Some("qcow2"));
    internal_snapshot => case("snapshot", with_snapshot, "new.qcow2", Some("qcow2"));
    external_data_file => case("datafile", data_file, "new.qcow2", Some("qcow2"));
    external_data_file_detach => case("datafile-detach", data_file, "", None);
    data_file_raw_refused => case("dfraw", data_file_raw, "new.qcow2", Some("raw"));
    data_file_raw_no_format => case("dfraw-nof", data_file_raw, "new.qcow2", None);
    data_file_raw_detach => case("dfraw-detach", data_file_raw, "", None);
    unknown_extensions_reversed => case("uext", unknown_exts_112, "new.qcow2", Some("qcow2"));
    header_length_104 => case("hl104", unknown_exts_104, "new.qcow2", Some("qcow2"));
    header_length_120 => case("hl120", unknown_exts_120, "new.qcow2", Some("qcow2"));
    v2_unknown_extension => case("v2-uext", v2_unknown_ext, "new.qcow2", Some("qcow2"));
    size_not_multiple_of_512 => case("oddsize", odd_size, "new.qcow2", Some("qcow2"));
    unknown_autoclear_cleared => case("autoclear", unknown_autoclear, "new.qcow2", Some("qcow2"));
    garbage_wiped => case("garbage", garbage_after_name, "new.qcow2", Some("qcow2"));
    names_are_c_strings => case("nul", bfmt_with_nul, "new.qcow2", Some("qcow2"));
    feature_table_regenerated => case("ftable", own_feature_table, "new.qcow2", Some("qcow2"));
    old_name_filled_cluster => case("full", name_ends_at_cluster_end, "new.qcow2", Some("qcow2"));
}

// Formats qemu-img cannot rebase.
fn raw_file(dir: &Path, _q: &Path) {
    std::fs::write(dir.join("ovl.qcow2"), vec![0u8; 1 << 20]).unwrap();
}
fn other_format(dir: &Path, q: &Path, fmt: &str) {
    ok(dir, q, &["create", "-q", "-f", fmt, "ovl.qcow2", "1M"]);
}
fn vdi(dir: &Path, q: &Path) {
    other_format(dir, q, "vdi");
}
fn vpc(dir: &Path, q: &Path) {
    other_format(dir, q, "vpc");
}
fn vhdx(dir: &Path, q: &Path) {
    other_format(dir, q, "vhdx");
}
fn qcow1(dir: &Path, q: &Path) {
    other_format(dir, q, "qcow");
}
fn parallels(dir: &Path, q: &Path) {
    other_format(dir, q, "parallels");
}

const fn as_format(mut c: Case, f: Format) -> Case {
    c.overlay_format = f;
    c
}
const fn only_10(mut c: Case) -> Case {
    c.only_10 = true;
    c
}

cases! {
    raw_overlay => as_format(case("raw", raw_file, "base.qcow2", Some("qcow2")), Format::Raw);
    raw_overlay_no_format => as_format(case("raw-nof", raw_file, "base.qcow2", None), Format::Raw);
    raw_overlay_detach => as_format(case("raw-detach", raw_file, "", None), Format::Raw);
    raw_as_qcow2 => case("raw-as-qcow2", raw_file, "base.qcow2", Some("qcow2"));
    raw_as_vmdk => as_format(case("raw-as-vmdk", raw_file, "b", Some("raw")), Format::Vmdk);
    raw_as_qed => as_format(case("raw-as-qed", raw_file, "b", Some("raw")), Format::Qed);
    raw_as_vdi => as_format(case("raw-as-vdi", raw_file, "b", Some("raw")), Format::Vdi);
    raw_as_vpc => as_format(case("raw-as-vpc", raw_file, "b", Some("raw")), Format::Vpc);
    raw_as_qcow => as_format(case("raw-as-qcow", raw_file, "b", Some("raw")), Format::Qcow);
    raw_as_luks => as_format(case("raw-as-luks", raw_file, "b", Some("raw")), Format::Luks);
    raw_as_parallels => as_format(case("raw-as-par", raw_file, "b", Some("raw")), Format::Parallels);
    raw_as_dmg => as_format(case("raw-as-dmg", raw_file, "b", Some("raw")), Format::Dmg);
    raw_as_bochs => as_format(case("raw-as-bochs", raw_file, "b", Some("raw")), Format::Bochs);
    raw_as_cloop => as_format(case("raw-as-cloop", raw_file, "b", Some("raw")), Format::Cloop);
    // vmdk overlays are rebased by instar (qemu-img refuses them): tests/vmdk_rebase.rs.
    vdi_overlay => as_format(case("vdi", vdi, "b", Some("raw")), Format::Vdi);
    vpc_overlay => as_format(case("vpc", vpc, "b", Some("raw")), Format::Vpc);
    vhdx_overlay => as_format(case("vhdx", vhdx, "b", Some("raw")), Format::Vhdx);
    qcow1_overlay => as_format(case("qcow1", qcow1, "b", Some("raw")), Format::Qcow);
    parallels_overlay => only_10(as_format(case("parallels", parallels, "b", Some("raw")), Format::Parallels));
}

/// Images a read-write open by QEMU would repair or re-store are refused before any
/// write, with instar's own words.
fn refused(make: Make, expect: &str) {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("refused");
    make(&dir, &q);
    let path = dir.join("ovl.qcow2");
    let request = Request::Rebase(RebaseRequest {
        overlay_format: Format::Qcow2,
        unsafe_mode: true,
        new_backing: Some(NewBacking {
            name: b"new.qcow2".to_vec(),
            format: Some(b"qcow2".to_vec()),
        }),
        old_chain: vec![],
        new_chain: vec![],
        in_chain: None,
        data_file_checked: true,
        progress: false,
        compress: false,
        keys: Vec::new(),
        zstd: Default::default(),
    });
    match run_guest(&path, request) {
        Response::Error(e) => assert!(e.message.contains(expect), "{e:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Persistent bitmaps are stored again (crates/cli/tests/diff_bitmaps.rs), but not in a
/// dirty overlay: QEMU stores them before it repairs the image on open.
#[test]
fn dirty_with_bitmaps_refused() {
    refused(
        |dir, q| {
            with_backing(dir, q, "");
            ok(dir, q, &["bitmap", "--add", "ovl.qcow2", "b0"]);
            or_be64(&dir.join("ovl.qcow2"), 72, 1);
        },
        "persistent bitmaps and the dirty bit set",
    );
}

#[test]
fn fixture_helpers_touch_what_they_claim() {
    // The hand layout really places the name where the header says.
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("helpers");
    three_unknown(&dir, &q, 120);
    let path = dir.join("ovl.qcow2");
    assert_eq!(be32_at(&path, 100), 120);
    let off = be64_at(&path, 8) as usize;
    assert_eq!(&read(&path)[off..off + 9], b"old.qcow2");
    let _ = std::fs::remove_dir_all(&dir);
}

// Images QEMU refuses to open read-write: same refusal, same words, nothing written.

fn set_be32(dir: &Path, offset: usize, v: u32) {
    patch(&dir.join("ovl.qcow2"), offset, &v.to_be_bytes());
}
fn set_be64(dir: &Path, offset: usize, v: u64) {
    patch(&dir.join("ovl.qcow2"), offset, &v.to_be_bytes());
}
fn incompat(dir: &Path, bits: u64) {
    or_be64(&dir.join("ovl.qcow2"), 72, bits);
}

macro_rules! broken {
    ($($test:ident => |$dir:ident, $q:ident| $body:block;)*) => {
        $(
            #[test]
            fn $test() {
                fn make($dir: &Path, $q: &Path) {
                    let _ = $q;
                    $body
                }
                run_case(&case(stringify!($test), make, "new.qcow2", Some("qcow2")));
            }
        )*
    };
}

const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

fn bitmaps_ext(nb: u32, reserved: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(nb.to_be_bytes());
    v.extend(reserved.to_be_bytes());
    v.extend(dir_size.to_be_bytes());
    v.extend(dir_offset.to_be_bytes());
    v
}

fn crypto_ext(offset: u64, len: u64) -> Vec<u8> {
    let mut v = offset.to_be_bytes().to_vec();
    v.extend(len.to_be_bytes());
    v
}

/// A plain 1 MiB image with the given extensions laid out by hand.
fn with_exts(dir: &Path, q: &Path, exts: &[(u32, &[u8])]) {
    create(dir, q, "", "1M");
    hand_layout(&dir.join("ovl.qcow2"), 112, exts, Some(b"old"), KIB64);
}

const MAX_LEN: u64 = 0x7fff_ffff_c000_0000;

broken! {
    corrupt_bit => |dir, q| { backed_64k(dir, q); incompat(dir, 2); };
    unknown_incompatible_bit => |dir, q| { backed_64k(dir, q); incompat(dir, 1 << 40); };
    unknown_incompatible_named => |dir, q| { own_feature_table(dir, q); incompat(dir, (1 << 50) | (1 << 41) | (1 << 3)); };
    unknown_incompatible_and_corrupt => |dir, q| { backed_64k(dir, q); incompat(dir, (1 << 63) | 2); };
    version_4 => |dir, q| { backed_64k(dir, q); set_be32(dir, 4, 4); };
    version_1 => |dir, q| { backed_64k(dir, q); set_be32(dir, 4, 1); };
    cluster_bits_8 => |dir, q| { backed_64k(dir, q); set_be32(dir, 20, 8); };
    cluster_bits_22 => |dir, q| { backed_64k(dir, q); set_be32(dir, 20, 22); };
    header_length_100 => |dir, q| { backed_64k(dir, q); set_be32(dir, 100, 100); };
    header_length_over_cluster => |dir, q| { backed_64k(dir, q); set_be32(dir, 100, 65537); };
    backing_offset_over_cluster => |dir, q| { backed_64k(dir, q); set_be64(dir, 8, 65537); };
    compression_type_2 => |dir, q| { backed_64k(dir, q); patch(&dir.join("ovl.qcow2"), 104, &[2]); };
    zlib_with_compression_bit => |dir, q| { backed_64k(dir, q); incompat(dir, 8); };
    zstd_without_compression_bit => |dir, q| {
        backed_zstd(dir, q);
        let v = be64_at(&dir.join("ovl.qcow2"), 72) & !8;
        set_be64(dir, 72, v);
    };
    subclusters_too_small => |dir, q| { backed_4k(dir, q); incompat(dir, 16); };
    refcount_order_7 => |dir, q| { backed_64k(dir, q); set_be32(dir, 96, 7); };
    no_refcount_table => |dir, q| { backed_64k(dir, q); set_be32(dir, 56, 0); };
    refcount_table_too_large => |dir, q| { backed_64k(dir, q); set_be32(dir, 56, 129); };
    refcount_table_unaligned => |dir, q| { backed_64k(dir, q); set_be64(dir, 48, 0x10200); };
    refcount_table_unreadable => |dir, q| { backed_64k(dir, q); set_be64(dir, 48, MAX_LEN); };
    snapshot_table_too_large => |dir, q| { backed_64k(dir, q); set_be32(dir, 60, 65537); };
    snapshot_table_unaligned => |dir, q| { backed_64k(dir, q); set_be32(dir, 60, 1); set_be64(dir, 64, 0x10008); };
    snapshot_table_unreadable => |dir, q| { backed_64k(dir, q); set_be32(dir, 60, 1); set_be64(dir, 64, MAX_LEN); };
    l1_too_large => |dir, q| { backed_64k(dir, q); set_be32(dir, 36, 0x40_0001); };
    l1_unaligned => |dir, q| { backed_64k(dir, q); set_be64(dir, 40, 0x30008); };
    l1_too_small => |dir, q| { backed_64k(dir, q); set_be32(dir, 36, 0); };
    l1_unreadable => |dir, q| { backed_64k(dir, q); set_be64(dir, 40, MAX_LEN - 65536); set_be32(dir, 36, 16384); };
    image_too_big => |dir, q| { backed_64k(dir, q); set_be64(dir, 24, 1 << 62); };
    encryption_method_3 => |dir, q| { backed_64k(dir, q); set_be32(dir, 32, 3); };
    encryption_method_huge => |dir, q| { backed_64k(dir, q); set_be32(dir, 32, 0xffff_fffe); };
    aes_without_secret => |dir, q| { backed_64k(dir, q); set_be32(dir, 32, 1); };
    luks_without_crypto_header => |dir, q| { backed_64k(dir, q); set_be32(dir, 32, 2); };
    extension_too_large => |dir, q| {
        backed_64k(dir, q);
        patch(&dir.join("ovl.qcow2"), 112, &[0x12, 0x34, 0x56, 0x78, 0, 1, 0, 0]);
    };
    extension_header_past_end => |dir, q| {
        create(dir, q, "", "1M");
        hand_layout(&dir.join("ovl.qcow2"), 112, &[], Some(b"old"), KIB64);
        // The name starts at 124: the end marker at 112 is cut short by it.
        set_be64(dir, 8, 116);
    };
    backing_format_16_bytes => |dir, q| { with_exts(dir, q, &[(BFMT, b"0123456789abcdef")]); };
    bitmaps_ext_length => |dir, q| { with_exts(dir, q, &[(EXT_BITMAPS, &[0u8; 23])]); };
    bitmaps_zero => |dir, q| {
        with_exts(dir, q, &[(EXT_BITMAPS, &bitmaps_ext(0, 0, 0, 0))]);
        or_be64(&dir.join("ovl.qcow2"), 88, 1);
    };
    bitmaps_reserved => |dir, q| {
        with_exts(dir, q, &[(EXT_BITMAPS, &bitmaps_ext(1, 1, 0, 0))]);
        or_be64(&dir.join("ovl.qcow2"), 88, 1);
    };
    bitmaps_too_many => |dir, q| {
        with_exts(dir, q, &[(EXT_BITMAPS, &bitmaps_ext(65536, 0, 0, 0))]);
        or_be64(&dir.join("ovl.qcow2"), 88, 1);
    };
    bitmaps_directory_unaligned => |dir, q| {
        with_exts(dir, q, &[(EXT_BITMAPS, &bitmaps_ext(1, 0, 0, 512))]);
        or_be64(&dir.join("ovl.qcow2"), 88, 1);
    };
    bitmaps_directory_too_large => |dir, q| {
        with_exts(dir, q, &[(EXT_BITMAPS, &bitmaps_ext(1, 0, 67_107_841, 65536))]);
        or_be64(&dir.join("ovl.qcow2"), 88, 1);
    };
    crypto_header_without_luks => |dir, q| { with_exts(dir, q, &[(EXT_CRYPTO, &crypto_ext(65536, 4096))]); };
    crypto_header_size => |dir, q| {
        with_exts(dir, q, &[(EXT_CRYPTO, &[0u8; 15])]);
        set_be32(dir, 32, 2);
    };
    crypto_header_unaligned => |dir, q| {
        with_exts(dir, q, &[(EXT_CRYPTO, &crypto_ext(4096, 4096))]);
        set_be32(dir, 32, 2);
    };
    crypto_header_needs_secret => |dir, q| {
        with_exts(dir, q, &[(EXT_CRYPTO, &crypto_ext(65536, 4096))]);
        set_be32(dir, 32, 2);
    };
    data_file_bit_without_name => |dir, q| { backed_64k(dir, q); incompat(dir, 4); };
    data_file_raw_without_data_file => |dir, q| { backed_64k(dir, q); or_be64(&dir.join("ovl.qcow2"), 88, 2); };
    data_file_name_without_bit_is_dropped => |dir, q| { with_exts(dir, q, &[(EXT_DATA_FILE, b"ignored.raw")]); };
    backing_name_1024 => |dir, q| { backed_64k(dir, q); set_be32(dir, 16, 1024); };
    backing_name_past_cluster => |dir, q| { backed_512(dir, q); set_be64(dir, 8, 400); set_be32(dir, 16, 113); };
    backing_name_to_cluster_end => |dir, q| { backed_512(dir, q); set_be64(dir, 8, 400); set_be32(dir, 16, 112); };
    snapshot_extra_data => |dir, q| {
        with_snapshot(dir, q);
        let table = be64_at(&dir.join("ovl.qcow2"), 64) as usize;
        set_be32(dir, table + 36, 1025);
    };
    snapshot_table_too_big => |dir, q| {
        backed_64k(dir, q);
        // 520 entries of 40 + 2 * 65535 bytes pass 64 MiB in total.
        let path = dir.join("ovl.qcow2");
        let start = 1u64 << 20;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut entry = [0u8; 40];
        entry[12..16].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let mut off = start;
        for _ in 0..520 {
            std::os::unix::fs::FileExt::write_all_at(&file, &entry, off).unwrap();
            off = (off + 40 + 2 * 65535).next_multiple_of(8);
        }
        drop(file);
        set_be32(dir, 60, 520);
        set_be64(dir, 64, start);
    };
    many_empty_snapshots => |dir, q| { backed_64k(dir, q); set_be32(dir, 60, 65536); set_be64(dir, 64, 1 << 30); };
    huge_size_wraps => |dir, q| { backed_64k(dir, q); set_be64(dir, 24, u64::MAX); };
}

#[test]
fn luks_encrypted_qcow2() {
    // qemu-img 10.2 here is built without a crypto library; 10.0 can make the image.
    if qemu_img_10_0().is_none() {
        return;
    }
    fn make(dir: &Path, _q: &Path) {
        let q10_0 = qemu_img_10_0().expect("found above");
        ok(
            dir,
            &q10_0,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=pw",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "ovl.qcow2",
                "1M",
            ],
        );
    }
    run_case(&case("luks", make, "new.qcow2", Some("qcow2")));
}
