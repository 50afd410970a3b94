//! The header parser on malformed and hostile input, without QEMU (the differential
//! tests in crates/rebase/tests compare the same refusals with qemu-img's words).

use instar_blockdev::MemDev;
use instar_qcow2::header::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
use instar_qcow2::{ChangeBackingError, Header, OpenError, OpenMode};

const CS: usize = 65536;

/// A minimal valid v3 image as qemu-img lays it out: header, refcount table in
/// cluster 1, L1 in cluster 3, 1 MiB virtual size.
fn image() -> Vec<u8> {
    let mut d = vec![0u8; 3 * CS + 8];
    put32(&mut d, 0, 0x5146_49fb);
    put32(&mut d, 4, 3);
    put32(&mut d, 20, 16);
    put64(&mut d, 24, 1 << 20);
    put32(&mut d, 36, 1);
    put64(&mut d, 40, 3 * CS as u64);
    put64(&mut d, 48, CS as u64);
    put32(&mut d, 56, 1);
    put32(&mut d, 96, 4);
    put32(&mut d, 100, 112);
    d
}

fn put32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn open(d: &[u8], mode: OpenMode) -> Result<Header, OpenError> {
    Header::read(&mut MemDev::read_only(d.to_vec()), mode)
}

fn refused(edit: impl Fn(&mut Vec<u8>), expect: &str) {
    let mut d = image();
    edit(&mut d);
    let err = open(&d, OpenMode::ReadWrite).expect_err(expect);
    assert_eq!(err.to_string(), expect);
}

#[test]
fn valid_image_opens() {
    let h = open(&image(), OpenMode::ReadWrite).unwrap();
    assert_eq!(
        (h.version, h.cluster_size(), h.virtual_size()),
        (3, 65536, 1 << 20)
    );
    assert_eq!(h.backing_file, None);
}

#[test]
fn each_fixed_field_check() {
    refused(|d| put32(d, 0, 0), "Image is not in qcow2 format");
    refused(|d| put32(d, 4, 5), "Unsupported qcow2 version 5");
    refused(
        |d| put32(d, 20, 0xffff_ffff),
        "Unsupported cluster size: 2^4294967295",
    );
    refused(|d| put32(d, 100, 103), "qcow2 header too short");
    refused(
        |d| put32(d, 100, 65537),
        "qcow2 header exceeds cluster size",
    );
    refused(|d| put64(d, 8, u64::MAX), "Invalid backing file offset");
    refused(|d| d[104] = 9, "qcow2: unknown compression type: 9");
    refused(
        |d| put64(d, 72, 8),
        "qcow2: Compression type incompatible feature bit must not be set",
    );
    refused(
        |d| d[104] = 1,
        "qcow2: Compression type incompatible feature bit must be set",
    );
    refused(
        |d| put64(d, 72, 2),
        "qcow2: Image is corrupt; cannot be opened read/write",
    );
    refused(
        |d| put64(d, 72, 1 << 63),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000",
    );
    refused(
        |d| put32(d, 96, 7),
        "Reference count entry width too large; may not exceed 64 bits",
    );
    refused(
        |d| put32(d, 56, 0),
        "Image does not contain a reference count table",
    );
    refused(|d| put32(d, 56, 1000), "Reference count table too large");
    refused(|d| put64(d, 48, 1), "Reference count table offset invalid");
    refused(
        |d| put64(d, 48, !0xffff),
        "Reference count table offset invalid",
    );
    refused(|d| put32(d, 60, 65537), "Snapshot table too large");
    refused(|d| put32(d, 36, u32::MAX), "Active L1 table too large");
    refused(|d| put32(d, 36, 0), "L1 table is too small");
    refused(|d| put64(d, 24, 1 << 62), "Image is too big");
    refused(|d| put32(d, 32, 7), "Unsupported encryption method 7");
    refused(
        |d| put32(d, 32, u32::MAX),
        "Unsupported encryption method -1",
    );
    refused(
        |d| put32(d, 32, 1),
        "Parameter 'encrypt.key-secret' is required for cipher",
    );
    refused(
        |d| put32(d, 32, 2),
        "Missing CRYPTO header for crypt method 2",
    );
    refused(
        |d| put64(d, 72, 4),
        "'data-file' is required for this image",
    );
    refused(|d| put64(d, 88, 2), "data-file-raw requires a data file");
}

#[test]
fn corrupt_image_opens_read_only() {
    let mut d = image();
    put64(&mut d, 72, 2);
    assert!(open(&d, OpenMode::ReadOnly).unwrap().corrupt());
}

#[test]
fn extension_area_checks() {
    refused(
        |d| {
            put32(d, 112, 0x1234);
            put32(d, 116, 65536);
        },
        "Header extension too large",
    );
    refused(
        |d| {
            put32(d, 112, EXT_BACKING_FORMAT);
            put32(d, 116, 16);
        },
        "ERROR: ext_backing_format: len=16 too large (>=16)",
    );
    refused(
        |d| {
            // The extension header itself would cross the backing name.
            put64(d, 8, 116);
        },
        "Header extension too large",
    );
    refused(
        |d| {
            put64(d, 8, 200);
            put32(d, 16, 1024);
        },
        "Backing file name too long",
    );
}

#[test]
fn unknown_features_are_named_from_the_image_table() {
    let mut d = image();
    put32(&mut d, 112, EXT_FEATURE_TABLE);
    put32(&mut d, 116, 3 * 48);
    // (0, 40, "forty"), (1, 41, "compat, not listed"), (0, 104 = 40 mod 64, "alias")
    d[120] = 0;
    d[121] = 40;
    d[122..127].copy_from_slice(b"forty");
    d[168] = 1;
    d[169] = 41;
    d[170..176].copy_from_slice(b"compat");
    d[216] = 0;
    d[217] = 104;
    d[218..223].copy_from_slice(b"alias");
    put64(&mut d, 72, (1 << 40) | (1 << 41) | (1 << 42));
    let err = open(&d, OpenMode::ReadOnly).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unsupported qcow2 feature(s): forty, Unknown incompatible feature: 60000000000"
    );
}

#[test]
fn rebuild_round_trips_through_the_parser() {
    let mut d = image();
    put32(&mut d, 100, 120);
    d[112..120].copy_from_slice(b"unknown!");
    let exts: [(u32, &[u8]); 3] = [
        (0x1000_0001, b"a"),
        (EXT_BACKING_FORMAT, b"qcow2"),
        (0x1000_0002, b"bbbbbbbbb"),
    ];
    let mut pos = 120;
    for (magic, body) in exts {
        put32(&mut d, pos, magic);
        put32(&mut d, pos + 4, body.len() as u32);
        d[pos + 8..pos + 8 + body.len()].copy_from_slice(body);
        pos += 8 + body.len().next_multiple_of(8);
    }
    pos += 8;
    d[pos..pos + 4].copy_from_slice(b"base");
    put64(&mut d, 8, pos as u64);
    put32(&mut d, 16, 4);
    put64(&mut d, 88, 1 << 40);
    put64(&mut d, 24, (1 << 20) + 7);

    let h = open(&d, OpenMode::ReadWrite).unwrap();
    assert_eq!(h.unknown_header_fields, b"unknown!");
    assert_eq!(h.backing_file.as_deref(), Some(&b"base"[..]));
    let c0 = h.rebuild().unwrap();
    assert_eq!(c0.len(), CS);
    let mut d2 = d.clone();
    d2[..CS].copy_from_slice(&c0);
    let h2 = open(&d2, OpenMode::ReadWrite).unwrap();
    assert_eq!(h2, h.after_rewrite());
    assert_eq!(
        h2.unknown_extensions,
        vec![
            (0x1000_0002, b"bbbbbbbbb".to_vec()),
            (0x1000_0001, b"a".to_vec())
        ]
    );
    assert_eq!(h2.autoclear_features, 0);
    assert_eq!(h2.size, 1 << 20);
}

#[test]
fn change_backing_limits() {
    let mut h = open(&image(), OpenMode::ReadWrite).unwrap();
    assert_eq!(
        h.change_backing(Some(&[b'x'; 1024]), Some(b"raw")),
        Err(ChangeBackingError::NameTooLong)
    );
    h.change_backing(Some(&[b'x'; 1023]), Some(b"copy-before-write"))
        .unwrap();
    // QEMU keeps the format in a 16-byte buffer.
    assert_eq!(h.backing_format.as_deref(), Some(&b"copy-before-wri"[..]));
    let c0 = h.rebuild().unwrap();
    let off = u64::from_be_bytes(c0[8..16].try_into().unwrap()) as usize;
    assert_eq!(&c0[off..off + 1023], &[b'x'; 1023][..]);

    let mut d = image();
    put32(&mut d, 20, 9);
    put64(&mut d, 40, 3 * 512);
    put64(&mut d, 48, 512);
    put32(&mut d, 36, 32);
    let mut h = open(&d, OpenMode::ReadWrite).unwrap();
    h.change_backing(Some(&[b'y'; 376]), Some(b"qcow2"))
        .unwrap();
    assert_eq!(h.rebuild().unwrap().len(), 512);
    h.change_backing(Some(&[b'y'; 377]), Some(b"qcow2"))
        .unwrap();
    assert_eq!(h.rebuild(), Err(ChangeBackingError::NoSpace));
}

#[test]
fn short_devices_read_as_zeros() {
    // A device holding only the magic: the rest reads as zero, so the version is 0.
    let err = open(b"QFI\xfb", OpenMode::ReadOnly).unwrap_err();
    assert_eq!(err.to_string(), "Unsupported qcow2 version 0");
    assert_eq!(
        open(b"", OpenMode::ReadOnly).unwrap_err(),
        OpenError::NotQcow2
    );
}

#[test]
fn hostile_bytes_never_panic() {
    // Deterministic xorshift over mutated headers: every outcome is Ok or a typed error.
    let base = image();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut d = base.clone();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() % 700) as usize;
            d[at] = next() as u8;
        }
        // Keep the cluster size sane half of the time so the extension walk runs.
        if next() % 2 == 0 {
            put32(&mut d, 20, 16);
        }
        for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
            if let Ok(h) = open(&d, mode) {
                let _ = h.rebuild();
            }
        }
    }
}
