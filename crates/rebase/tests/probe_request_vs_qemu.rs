//! `Request::Probe` against `qemu-img info`: format, virtual size, cluster size,
//! backing file, backing format and data file agree.

mod common;

use std::path::Path;

use common::*;
use instar_abi::{Format, ImageInfo, ProbeRequest, Request, Response};

fn probe(path: &Path, format: Option<Format>) -> Response {
    run_guest(
        path,
        Request::Probe(ProbeRequest {
            dev: 0,
            format,
            writable: false,
            key: None,
            derive_key: true,
        }),
    )
}

/// The value of a `key: value` line of `qemu-img info`.
fn field(info: &str, key: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.trim_start()
            .strip_prefix(key)
            .map(|v| v.trim().to_string())
    })
}

fn check(q: &Path, dir: &Path, file: &str) {
    let out = std::process::Command::new(q)
        .args(["info", "-U", file])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    let Response::Probe(got) = probe(&dir.join(file), None) else {
        panic!("{file}: probe failed")
    };
    let ImageInfo {
        format,
        virtual_size,
        cluster_size,
        backing_file,
        backing_format,
        data_file,
        ..
    } = got;
    let name = |v: Option<Vec<u8>>| v.map(|b| String::from_utf8(b).unwrap());
    assert_eq!(
        Some(format.name().to_string()),
        field(&info, "file format:"),
        "{file}"
    );
    let size = field(&info, "virtual size:").unwrap();
    assert!(
        size.ends_with(&format!("({virtual_size} bytes)")),
        "{file}: {size} vs {virtual_size}"
    );
    if cluster_size != 0 {
        assert_eq!(
            Some(cluster_size.to_string()),
            field(&info, "cluster_size:"),
            "{file}"
        );
    }
    let qemu_backing =
        field(&info, "backing file:").map(|b| b.split(" (actual path").next().unwrap().to_string());
    assert_eq!(name(backing_file), qemu_backing, "{file}");
    assert_eq!(
        name(backing_format),
        field(&info, "backing file format:"),
        "{file}"
    );
    assert_eq!(name(data_file), field(&info, "data file:"), "{file}");
}

#[test]
fn probe_reports_what_qemu_img_info_shows() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("probe");
    let make = |args: &[&str]| ok(&dir, &q, args);
    make(&["create", "-q", "-f", "qcow2", "plain.qcow2", "3M"]);
    make(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,compat=0.10",
        "v2.qcow2",
        "1000000",
    ]);
    make(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "df.qcow2",
        "1M",
    ]);
    make(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "plain.qcow2",
        "-F",
        "qcow2",
        "ovl.qcow2",
    ]);
    make(&["create", "-q", "-f", "vmdk", "base.vmdk", "2M"]);
    make(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "child.vmdk",
    ]);
    make(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "flat.vmdk",
        "1M",
    ]);
    std::fs::write(dir.join("odd.raw"), vec![1u8; 1000]).unwrap();
    make(&["create", "-q", "-f", "qed", "plain.qed", "3M"]);
    make(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "odd.raw",
        "-F",
        "raw",
        "raw-b.qed",
        "1M",
    ]);
    make(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        "-b",
        "plain.qcow2",
        "-F",
        "qcow2",
        "q-b.qed",
    ]);
    for f in ["plain.qed", "raw-b.qed", "q-b.qed"] {
        check(&q, &dir, f);
    }
    for f in [
        "plain.qcow2",
        "v2.qcow2",
        "df.qcow2",
        "ovl.qcow2",
        "base.vmdk",
        "child.vmdk",
        "flat.vmdk",
        "odd.raw",
    ] {
        check(&q, &dir, f);
    }
    // Formats instar does not read are still named.
    make(&["create", "-q", "-f", "vdi", "x.vdi", "1M"]);
    let Response::Probe(info) = probe(&dir.join("x.vdi"), None) else {
        panic!()
    };
    assert_eq!(info.format, Format::Vdi);
    // An explicit format is checked: a raw file is not qcow2.
    let Response::Error(e) = probe(&dir.join("odd.raw"), Some(Format::Qcow2)) else {
        panic!()
    };
    assert_eq!(e.message, "Image is not in qcow2 format");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first extent file `qemu-img info` lists for a vmdk image (its extents are indented
/// below `extents:`), when it is not the image itself.
fn first_extent(q: &Path, dir: &Path, file: &str) -> Option<String> {
    let out = std::process::Command::new(q)
        .args(["info", "-U", file])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{file}: qemu-img info failed");
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    info.lines()
        .find_map(|l| l.strip_prefix("            filename: "))
        .map(str::to_string)
        .filter(|f| f != file)
}

fn probed(dir: &Path, file: &str) -> ImageInfo {
    match probe(&dir.join(file), None) {
        Response::Probe(info) => info,
        other => panic!("{file}: {other:?}"),
    }
}

#[test]
fn probe_reports_the_files_qemu_opens_with_an_image() {
    // The probe rule (docs/path-policy.md) needs every other file QEMU would open with a
    // probed image: qcow and qed backing files, and vmdk extent files.
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("probe-names");
    let make = |args: &[&str]| ok(&dir, &q, args);
    make(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for (fmt, file) in [("qcow", "b.qcow"), ("qed", "b.qed")] {
        make(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            file,
        ]);
        make(&["create", "-q", "-f", fmt, &format!("plain-{file}"), "1M"]);
        let info = probed(&dir, file);
        assert_eq!(info.format.name(), fmt);
        assert_eq!(
            info.backing_file.as_deref(),
            Some(&b"base.qcow2"[..]),
            "{file}"
        );
        assert_eq!(probed(&dir, &format!("plain-{file}")).backing_file, None);
        check_backing_line(&q, &dir, file);
    }
    for (sub, file) in [
        ("monolithicSparse", "sparse.vmdk"),
        ("streamOptimized", "stream.vmdk"),
        ("monolithicFlat", "flat.vmdk"),
        ("twoGbMaxExtentSparse", "two.vmdk"),
        ("twoGbMaxExtentFlat", "twoflat.vmdk"),
    ] {
        make(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            file,
            "1M",
        ]);
        let got = probed(&dir, file)
            .extent_file
            .map(|n| String::from_utf8(n).unwrap());
        assert_eq!(got, first_extent(&q, &dir, file), "{file} ({sub})");
    }
    // A sparse header with capacity 0 and a descriptor offset: QEMU opens the embedded
    // descriptor's extents.
    std::fs::copy(dir.join("sparse.vmdk"), dir.join("deferring.vmdk")).unwrap();
    std::fs::copy(dir.join("flat-flat.vmdk"), dir.join("victim.raw")).unwrap();
    let mut b = std::fs::read(dir.join("deferring.vmdk")).unwrap();
    b[12..20].copy_from_slice(&0u64.to_le_bytes());
    let edit = |b: &mut Vec<u8>, from: &[u8], to: &[u8]| {
        let at = b.windows(from.len()).position(|w| w == from).unwrap();
        b[at..at + to.len()].copy_from_slice(to);
    };
    edit(
        &mut b,
        b"createType=\"monolithicSparse\"",
        b"createType=\"monolithicFlat\"  ",
    );
    edit(
        &mut b,
        b"RW 2048 SPARSE \"sparse.vmdk\"",
        b"RW 2048 FLAT \"victim.raw\" 0  ",
    );
    std::fs::write(dir.join("deferring.vmdk"), &b).unwrap();
    let got = probed(&dir, "deferring.vmdk").extent_file;
    assert_eq!(got.as_deref(), Some(&b"victim.raw"[..]));
    assert_eq!(
        first_extent(&q, &dir, "deferring.vmdk").as_deref(),
        Some("victim.raw")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qemu-img info` names the same backing file.
fn check_backing_line(q: &Path, dir: &Path, file: &str) {
    let out = std::process::Command::new(q)
        .args(["info", "-U", file])
        .current_dir(dir)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        field(&info, "backing file:").as_deref(),
        Some("base.qcow2"),
        "{file}"
    );
}
