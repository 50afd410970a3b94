//! The format probe against `qemu-img info`: every format qemu-img can create is
//! recognised as the same format qemu-img's own probe picks.

use std::path::Path;
use std::process::Command;

use instar_abi::Format;
use instar_blockdev::MemDev;
use instar_chain::probe::probe;

use instar_testkit::qemu_ref::{self, reference_img as qemu_img};
use instar_testkit::Scratch;

/// The format qemu-img's probe reports for `file`.
fn qemu_format(q: &Path, dir: &Path, file: &str) -> String {
    let out = Command::new(q)
        .args(["info", file])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "info {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("file format: "))
        .expect("file format line");
    line.trim().to_string()
}

fn ours(dir: &Path, file: &str) -> Format {
    let mut dev = MemDev::read_only(std::fs::read(dir.join(file)).unwrap());
    probe(&mut dev).unwrap()
}

#[test]
fn formats_created_by_qemu_img() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("probe");
    let mut files: Vec<(String, Vec<String>)> = vec![];
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "compat=0.10"),
        ("qcow", ""),
        ("vmdk", ""),
        ("vmdk", "subformat=monolithicFlat"),
        ("vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("qed", ""),
        ("vdi", ""),
        ("vpc", ""),
        ("vpc", "subformat=fixed"),
        ("vhdx", ""),
        ("parallels", ""),
        ("raw", ""),
    ] {
        let name = format!("img-{fmt}-{}", files.len());
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), fmt.into()];
        if !opts.is_empty() {
            args.extend(["-o".into(), opts.into()]);
        }
        args.extend([name.clone(), "1M".into()]);
        files.push((name, args));
    }
    for (name, args) in &files {
        let st = Command::new(&q)
            .args(args)
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
        let expect = qemu_format(&q, &dir, name);
        let got = ours(&dir, name);
        assert_eq!(got.name(), expect, "{name}");
    }
    // LUKS needs a crypto library, which the 10.2 build here lacks.
    if let Some(q10_0) = qemu_ref::find("10.0") {
        let st = Command::new(&q10_0.img)
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=s0,data=pw",
                "-o",
                "key-secret=s0,iter-time=10",
                "l.luks",
                "1M",
            ])
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(ours(&dir, "l.luks").name(), qemu_format(&q, &dir, "l.luks"));
        assert_eq!(ours(&dir, "l.luks"), Format::Luks);
    }
    // Files no driver claims are raw; so is an empty file. A hand-written descriptor
    // (comment, a blank line of spaces, CRLF) is vmdk.
    std::fs::write(dir.join("flat.raw"), vec![0u8; 1 << 20]).unwrap();
    for (name, bytes) in [
        ("empty", Vec::new()),
        ("tiny", b"hi\n".to_vec()),
        ("zeros", vec![0u8; 4096]),
        (
            "desc",
            b"# Disk DescriptorFile\n   \r\nversion=1\r\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"flat.raw\" 0\n"
                .to_vec(),
        ),
        ("blank-line-first", b"\nversion=1\n".to_vec()),
        ("qcow2-v0", [&b"QFI\xfb"[..], &[0u8; 60]].concat()),
    ] {
        std::fs::write(dir.join(name), &bytes).unwrap();
        assert_eq!(ours(&dir, name).name(), qemu_format(&q, &dir, name), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
