//! Rebase of vmdk overlays through `instar_rebase::handle` over in-memory devices,
//! checked with qemu-img 10.2: `check` clean, `compare` against the overlay before
//! the rebase (through its old chain) identical, and `info` naming the new parent
//! with `parent-cid` equal to its `cid`. qemu-img itself refuses every vmdk rebase,
//! so there is no file to compare byte for byte; the descriptor text is compared
//! with what `qemu-img create` writes instead.

mod common;

use std::path::Path;

use common::*;
use instar_abi::{
    Call, ChainImage, ErrorKind, Format, NewBacking, RebaseOutcome, RebaseRequest, Request,
    Response,
};
use instar_blockdev::{BlockDev, MemDev};
use instar_rebase::handle;

const DESC: std::ops::Range<usize> = 512..512 + 10240;

fn create(dir: &Path, q: &Path, name: &str, size: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    args.extend_from_slice(extra);
    args.extend([name, size]);
    ok(dir, q, &args);
}

fn io(dir: &Path, q: &Path, name: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "vmdk"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(name);
    ok(dir, &qemu_io(q), &args);
}

fn stdout(dir: &Path, prog: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        prog.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What `qemu-img info --output=json` says about the parent link.
#[derive(Debug, PartialEq, Eq)]
struct Info {
    backing: Option<String>,
    backing_format: Option<String>,
    cid: u64,
    parent_cid: u64,
}

fn info(dir: &Path, q: &Path, name: &str) -> Info {
    let text = stdout(dir, q, &["info", "--output=json", name]);
    let string = |key: &str| {
        let k = format!("\"{key}\": \"");
        text.find(&k).map(|p| {
            let rest = &text[p + k.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
    };
    let number = |key: &str| {
        let k = format!("\"{key}\": ");
        let p = text
            .find(&k)
            .unwrap_or_else(|| panic!("no {key} in {text}"));
        text[p + k.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    Info {
        backing: string("backing-filename"),
        backing_format: string("backing-filename-format"),
        cid: number("cid"),
        parent_cid: number("parent-cid"),
    }
}

fn descriptor(path: &Path) -> String {
    let d = std::fs::read(path).unwrap()[DESC].to_vec();
    let end = d.iter().position(|&c| c == 0).unwrap();
    String::from_utf8(d[..end].to_vec()).unwrap()
}

struct Run {
    resp: Response,
    write_phase: bool,
}

/// Handle `req` with `files[0]` (the overlay) read-write and the others read-only;
/// the overlay is written back on success and must be unchanged on error.
fn run_vmdk(dir: &Path, files: &[&str], req: RebaseRequest) -> Run {
    let data: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let mut devs: Vec<MemDev> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i == 0 {
                MemDev::new(d.clone())
            } else {
                MemDev::read_only(d.clone())
            }
        })
        .collect();
    let call = Call {
        device_sizes: data.iter().map(|d| d.len() as u64).collect(),
        request: Request::Rebase(req),
    };
    let mut hooks = RecordingHooks::default();
    let resp = {
        let mut refs: Vec<&mut dyn BlockDev> =
            devs.iter_mut().map(|d| d as &mut dyn BlockDev).collect();
        handle(&call, &mut refs, &mut hooks)
    };
    let ovl = &devs[0];
    match &resp {
        Response::Error(_) => {
            assert!(ovl.writes.is_empty(), "writes after an error");
            assert!(!hooks.write_phase);
            assert_eq!(ovl.data, data[0]);
        }
        Response::Rebase(out) => {
            hooks.check_writes(ovl);
            let mut bytes = ovl.data.clone();
            if let Some(len) = out.overlay_len {
                assert!(len as usize <= bytes.len() + 511 && len as usize >= data[0].len());
                bytes.resize(len as usize, 0);
            }
            std::fs::write(dir.join(files[0]), bytes).unwrap();
        }
        other => panic!("unexpected response {other:?}"),
    }
    Run {
        resp,
        write_phase: hooks.write_phase,
    }
}

fn vmdk(dev: u8) -> ChainImage {
    ChainImage {
        dev,
        format: Format::Vmdk,
    }
}

fn request(unsafe_mode: bool, name: &str, format: Option<&str>) -> RebaseRequest {
    RebaseRequest {
        overlay_format: Format::Vmdk,
        unsafe_mode,
        new_backing: Some(NewBacking {
            name: name.as_bytes().to_vec(),
            format: format.map(|f| f.as_bytes().to_vec()),
        }),
        old_chain: vec![],
        new_chain: vec![],
        in_chain: None,
        data_file_checked: true,
        progress: false,
        compress: false,
        keys: Vec::new(),
        zstd: Default::default(),
    }
}

fn expect_ok(r: &Run) {
    assert!(
        matches!(r.resp, Response::Rebase(_)),
        "rebase failed: {:?}",
        r.resp
    );
    assert!(r.write_phase);
}

fn expect_err(r: &Run, kind: ErrorKind, message: &str) {
    match &r.resp {
        Response::Error(e) => {
            assert_eq!(e.kind, kind, "{e:?}");
            assert!(
                e.message.contains(message),
                "{:?} lacks {message:?}",
                e.message
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

fn check_clean(dir: &Path, q: &Path, name: &str) {
    let (success, err) = run(dir, q, &["check", name]);
    assert!(success, "qemu-img check {name}: {err}");
}

/// Same guest content: `before` (in `before_dir`) and `after` (in `after_dir`).
fn same_content(q: &Path, before: &Path, after: &Path) {
    let (success, err) = run(
        Path::new("/"),
        q,
        &["compare", before.to_str().unwrap(), after.to_str().unwrap()],
    );
    assert!(
        success,
        "compare {} {}: {err}",
        before.display(),
        after.display()
    );
}

/// vb (0x11 at 0, 0x12 at 512k), vb2 (0x22 at 0, 0x44 at 192k) and vo on vb with its own 0x33 at 128k.
fn family(dir: &Path, q: &Path, size: &str) {
    family_with(dir, q, size, &[]);
}

/// [`family`] with more writes to vb.vmdk (before vo.vmdk records its CID).
fn family_with(dir: &Path, q: &Path, size: &str, vb_more: &[&str]) {
    create(dir, q, "vb.vmdk", size, &[]);
    let mut cmds = vec!["write -P 0x11 0 64k", "write -P 0x12 512k 100k"];
    cmds.extend_from_slice(vb_more);
    io(dir, q, "vb.vmdk", &cmds);
    create(dir, q, "vb2.vmdk", size, &[]);
    io(
        dir,
        q,
        "vb2.vmdk",
        &["write -P 0x22 0 64k", "write -P 0x44 192k 64k"],
    );
    create(dir, q, "vo.vmdk", size, &["-b", "vb.vmdk", "-F", "vmdk"]);
    io(dir, q, "vo.vmdk", &["write -P 0x33 128k 64k"]);
}

#[test]
fn unsafe_rename_sets_parent_cid() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-rename");
    family(&dir, &q, "1M");
    let before = descriptor(&dir.join("vo.vmdk"));
    let old = info(&dir, &q, "vo.vmdk");
    let vb2 = info(&dir, &q, "vb2.vmdk");
    let mut req = request(true, "vb2.vmdk", Some("vmdk"));
    req.new_chain = vec![vmdk(1)];
    expect_ok(&run_vmdk(&dir, &["vo.vmdk", "vb2.vmdk"], req));
    let new = info(&dir, &q, "vo.vmdk");
    assert_eq!(
        new,
        Info {
            backing: Some("vb2.vmdk".into()),
            backing_format: Some("vmdk".into()),
            cid: old.cid,
            parent_cid: vb2.cid,
        }
    );
    // Only the two lines changed.
    let want = before
        .replace(
            &format!("parentCID={:x}\n", old.parent_cid),
            &format!("parentCID={:x}\n", vb2.cid),
        )
        .replace("\"vb.vmdk\"", "\"vb2.vmdk\"");
    assert_eq!(descriptor(&dir.join("vo.vmdk")), want);
    check_clean(&dir, &q, "vo.vmdk");
    // 0x33 at 128k over vb2.
    let expect = Scratch::copy_of(&dir, "vmdk-rename-expect");
    io(&expect, &q, "vb2.vmdk", &["write -P 0x33 128k 64k"]);
    same_content(&q, &expect.join("vb2.vmdk"), &dir.join("vo.vmdk"));
}

#[test]
fn unsafe_detach_and_attach_match_qemus_template() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-detach");
    family(&dir, &q, "1M");
    let old = info(&dir, &q, "vo.vmdk");
    expect_ok(&run_vmdk(&dir, &["vo.vmdk"], request(true, "", None)));
    let new = info(&dir, &q, "vo.vmdk");
    assert_eq!(
        new,
        Info {
            backing: None,
            backing_format: None,
            cid: old.cid,
            parent_cid: 0xffff_ffff,
        }
    );
    check_clean(&dir, &q, "vo.vmdk");
    // Byte for byte the descriptor of `qemu-img create` without a parent.
    create(&dir, &q, "fresh.vmdk", "1M", &[]);
    let fresh = descriptor(&dir.join("fresh.vmdk"))
        .replace(
            &format!("CID={:x}\n", info(&dir, &q, "fresh.vmdk").cid),
            &format!("CID={:x}\n", old.cid),
        )
        .replace("\"fresh.vmdk\"", "\"vo.vmdk\"");
    assert_eq!(descriptor(&dir.join("vo.vmdk")), fresh);

    // Attach the now parentless overlay to vb: the descriptor of `create -b`.
    let mut req = request(true, "vb.vmdk", None);
    req.new_chain = vec![vmdk(1)];
    expect_ok(&run_vmdk(&dir, &["vo.vmdk", "vb.vmdk"], req));
    let vb = info(&dir, &q, "vb.vmdk");
    assert_eq!(info(&dir, &q, "vo.vmdk").parent_cid, vb.cid);
    create(
        &dir,
        &q,
        "child.vmdk",
        "1M",
        &["-b", "vb.vmdk", "-F", "vmdk"],
    );
    let child = descriptor(&dir.join("child.vmdk"))
        .replace(
            &format!("CID={:x}\n", info(&dir, &q, "child.vmdk").cid),
            &format!("CID={:x}\n", old.cid),
        )
        .replace("\"child.vmdk\"", "\"vo.vmdk\"");
    assert_eq!(descriptor(&dir.join("vo.vmdk")), child);
    check_clean(&dir, &q, "vo.vmdk");
    let expect = Scratch::copy_of(&dir, "vmdk-attach-expect");
    io(&expect, &q, "vb.vmdk", &["write -P 0x33 128k 64k"]);
    same_content(&q, &expect.join("vb.vmdk"), &dir.join("vo.vmdk"));
}

#[test]
fn unsafe_refusals_leave_the_overlay_unchanged() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-refuse");
    family(&dir, &q, "1M");
    ok(&dir, &q, &["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    let files = ["vo.vmdk", "vb2.vmdk"];
    let with_chain = |name: &str, format: Option<&str>, chain_format: Format| {
        let mut r = request(true, name, format);
        r.new_chain = vec![ChainImage {
            dev: 1,
            format: chain_format,
        }];
        r
    };
    // QEMU reads parent names of at most 4095 bytes.
    let original = std::fs::read(dir.join("vo.vmdk")).unwrap();
    let long = "x".repeat(4095);
    let r = run_vmdk(&dir, &files, with_chain(&long, None, Format::Vmdk));
    assert!(
        matches!(r.resp, Response::Rebase(_)),
        "4095 bytes fit: {:?}",
        r.resp
    );
    assert_eq!(
        info(&dir, &q, "vo.vmdk").backing.as_deref(),
        Some(long.as_str())
    );
    std::fs::write(dir.join("vo.vmdk"), &original).unwrap();
    let too_long = "x".repeat(4096);
    let r = run_vmdk(&dir, &files, with_chain(&too_long, None, Format::Vmdk));
    expect_err(&r, ErrorKind::ChangeBacking, "4095");
    for bad in ["a\"b.vmdk", "a\nb.vmdk", "a\0b"] {
        let r = run_vmdk(&dir, &files, with_chain(bad, None, Format::Vmdk));
        expect_err(&r, ErrorKind::ChangeBacking, "double quote");
    }
    // The new parent is not a vmdk, or -F says otherwise.
    let r = run_vmdk(
        &dir,
        &["vo.vmdk", "q.qcow2"],
        with_chain("q.qcow2", None, Format::Qcow2),
    );
    expect_err(
        &r,
        ErrorKind::ChangeBacking,
        "Invalid backing file format: qcow2. Must be vmdk",
    );
    let r = run_vmdk(
        &dir,
        &files,
        with_chain("vb2.vmdk", Some("qcow2"), Format::Vmdk),
    );
    expect_err(
        &r,
        ErrorKind::ChangeBacking,
        "backing_file must be a vmdk image",
    );
    // A qcow2 file claimed as vmdk.
    let r = run_vmdk(
        &dir,
        &["vo.vmdk", "q.qcow2"],
        with_chain("q.qcow2", None, Format::Vmdk),
    );
    expect_err(&r, ErrorKind::Open { dev: 1 }, "VMDK");
    // No new parent attached: its CID is unknown.
    let r = run_vmdk(&dir, &files, request(true, "vb2.vmdk", None));
    expect_err(&r, ErrorKind::Plain, "CID");
}

/// Fuzzing found it: a grain table entry naming a sector of the descriptor area made
/// the descriptor rewrite change that grain's data (exit 0, content changed).
#[test]
fn grain_in_descriptor_area_is_refused() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-grain-over-descriptor");
    family(&dir, &q, "1M");
    let path = dir.join("vo.vmdk");
    let d = std::fs::read(&path).unwrap();
    let le = |d: &[u8], at: usize, n: usize| {
        d[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b)) as usize
    };
    let gd = le(&d, 56, 8) * 512;
    let gt = le(&d, gd, 4) * 512;
    for (what, at, sector) in [("a grain", gt + 3 * 4, 1u32), ("a grain table", gd, 20)] {
        let mut bad = d.clone();
        bad[at..at + 4].copy_from_slice(&sector.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let r = run_vmdk(&dir, &["vo.vmdk", "vb2.vmdk"], {
            let mut r = request(true, "vb2.vmdk", None);
            r.new_chain = vec![vmdk(1)];
            r
        });
        expect_err(
            &r,
            ErrorKind::Open { dev: 0 },
            &format!("{what} at sector {sector} lies in the header or descriptor area"),
        );
        let mut r = request(false, "", None);
        r.new_backing = None;
        r.old_chain = vec![vmdk(1)];
        let r = run_vmdk(&dir, &["vo.vmdk", "vb.vmdk"], r);
        expect_err(&r, ErrorKind::Open { dev: 0 }, "descriptor area");
    }
}

#[test]
fn descriptor_full_is_refused() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-full");
    family(&dir, &q, "1M");
    // Pad the descriptor text with a comment line to 10000 bytes.
    let path = dir.join("vo.vmdk");
    let mut data = std::fs::read(&path).unwrap();
    let text = descriptor(&path);
    let padded = format!("{text}#{}\n", "p".repeat(10000 - text.len() - 2));
    data[512..512 + padded.len()].copy_from_slice(padded.as_bytes());
    std::fs::write(&path, &data).unwrap();
    check_clean(&dir, &q, "vo.vmdk");
    // The name that makes the text exactly 10239 bytes fits; one byte more does not.
    let old_cid = format!("{:x}", info(&dir, &q, "vo.vmdk").parent_cid).len();
    let new_cid = format!("{:x}", info(&dir, &q, "vb2.vmdk").cid).len();
    let fit = 10239 - (10000 - "vb.vmdk".len() - old_cid + new_cid);
    let files = ["vo.vmdk", "vb2.vmdk"];
    for (len, fits) in [(fit + 1, false), (fit, true)] {
        let mut req = request(true, &"n".repeat(len), None);
        req.new_chain = vec![vmdk(1)];
        let r = run_vmdk(&dir, &files, req);
        if fits {
            expect_ok(&r);
            assert_eq!(descriptor(&path).len(), 10239);
            assert_eq!(info(&dir, &q, "vo.vmdk").backing, Some("n".repeat(len)));
            std::fs::copy(dir.join("vb2.vmdk"), dir.join("n".repeat(len))).unwrap();
            check_clean(&dir, &q, "vo.vmdk");
        } else {
            expect_err(&r, ErrorKind::ChangeBacking, "No space left");
        }
    }
}

#[test]
fn stream_optimized_is_refused() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-stream");
    create(
        &dir,
        &q,
        "s.vmdk",
        "1M",
        &["-o", "subformat=streamOptimized"],
    );
    let r = run_vmdk(&dir, &["s.vmdk"], request(true, "", None));
    expect_err(&r, ErrorKind::Open { dev: 0 }, "streamOptimized");
}

/// Run a safe rebase on a copy of `dir` and check it against the original.
/// Returns the outcome and `qemu-img map --output=json` of the result.
fn safe_case(
    dir: &Path,
    q: &Path,
    files: &[&str],
    req: RebaseRequest,
    want_backing: Option<&str>,
) -> (RebaseOutcome, String) {
    let out = Scratch::copy_of(dir, "vmdk-safe-out");
    let r = run_vmdk(&out, files, req);
    expect_ok(&r);
    let Response::Rebase(outcome) = r.resp else {
        unreachable!()
    };
    check_clean(&out, q, files[0]);
    same_content(q, &dir.join(files[0]), &out.join(files[0]));
    let before = info(dir, q, files[0]);
    let after = info(&out, q, files[0]);
    assert_eq!(after.backing.as_deref(), want_backing);
    assert_eq!(after.cid, before.cid);
    match want_backing {
        Some(b) => assert_eq!(after.parent_cid, info(&out, q, b).cid),
        None => assert_eq!(after.parent_cid, 0xffff_ffff),
    }
    (
        outcome,
        stdout(&out, q, &["map", "--output=json", files[0]]),
    )
}

/// The `qemu-img map` entry that starts at `start`.
fn map_entry(map: &str, start: u64) -> &str {
    let key = format!("{{ \"start\": {start},");
    let p = map
        .find(&key)
        .unwrap_or_else(|| panic!("no entry at {start}: {map}"));
    &map[p..p + map[p..].find('}').unwrap()]
}

#[test]
fn safe_onto_unrelated_vmdk() {
    let Some(q) = qemu_img() else { return };
    // 2 MiB + 32 KiB: the last grain is partial.
    for size in ["4M", "2080k"] {
        let dir = Scratch::new("vmdk-safe-unrelated");
        family(&dir, &q, size);
        let mut req = request(false, "vb2.vmdk", Some("vmdk"));
        req.old_chain = vec![vmdk(1)];
        req.new_chain = vec![vmdk(2)];
        let (out, map) = safe_case(
            &dir,
            &q,
            &["vo.vmdk", "vb.vmdk", "vb2.vmdk"],
            req,
            Some("vb2.vmdk"),
        );
        // Grains 0 (0x11 / 0x22), 3 (- / 0x44), 8 and 9 (0x12 / -); 2 is vo's own.
        assert_eq!(out.stats.clusters_copied, 4, "{size}");
        assert_eq!(out.stats.bytes_copied, 4 << 16, "{size}");
        // 8 and 9 are allocated together, so map merges them.
        for grain in [0u64, 3, 8] {
            assert!(map_entry(&map, grain << 16)
                .contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"));
        }
    }
}

#[test]
fn safe_flatten() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-safe-flatten");
    family_with(&dir, &q, "2080k", &["write -P 0x55 2048k 32k"]);
    let mut req = request(false, "", None);
    req.old_chain = vec![vmdk(1)];
    let (out, map) = safe_case(&dir, &q, &["vo.vmdk", "vb.vmdk"], req, None);
    // Grains 0, 8, 9 and the partial last grain at 2 MiB.
    assert_eq!(out.stats.clusters_copied, 4);
    assert_eq!(out.stats.bytes_copied, (3 << 16) + (32 << 10));
    assert!(map_entry(&map, 2 << 20).contains(
        "\"length\": 32768, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"
    ));
}

#[test]
fn safe_attach_to_parentless_overlay_writes_zeroes() {
    let Some(q) = qemu_img() else { return };
    for zeroed in ["off", "on"] {
        let dir = Scratch::new("vmdk-safe-attach");
        family(&dir, &q, "1M");
        create(
            &dir,
            &q,
            "lone.vmdk",
            "1M",
            &["-o", &format!("zeroed_grain={zeroed}")],
        );
        io(&dir, &q, "lone.vmdk", &["write -P 0x66 64k 64k"]);
        let mut req = request(false, "vb2.vmdk", None);
        req.new_chain = vec![vmdk(1)];
        let (out, map) = safe_case(&dir, &q, &["lone.vmdk", "vb2.vmdk"], req, Some("vb2.vmdk"));
        // No old backing: grains 0 and 3 get zeroes, as zeroed grains when the image
        // allows them, else as zero data.
        assert_eq!(out.stats.bytes_copied, 0);
        let want = if zeroed == "on" {
            "\"present\": true, \"zero\": true, \"data\": false"
        } else {
            "\"present\": true, \"zero\": false, \"data\": true"
        };
        for grain in [0u64, 3] {
            let e = map_entry(&map, grain << 16);
            assert!(
                e.contains("\"length\": 65536, \"depth\": 0,") && e.contains(want),
                "{e}"
            );
        }
    }
}

#[test]
fn safe_in_chain_drops_a_middle_image() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-safe-inchain");
    create(&dir, &q, "base.vmdk", "3M", &[]);
    io(&dir, &q, "base.vmdk", &["write -P 0x11 0 3M"]);
    create(
        &dir,
        &q,
        "mid.vmdk",
        "3M",
        &["-b", "base.vmdk", "-F", "vmdk"],
    );
    io(
        &dir,
        &q,
        "mid.vmdk",
        &["write -P 0x22 64k 128k", "write -P 0x23 2M 4k"],
    );
    create(
        &dir,
        &q,
        "top.vmdk",
        "3M",
        &["-b", "mid.vmdk", "-F", "vmdk"],
    );
    io(&dir, &q, "top.vmdk", &["write -P 0x33 128k 64k"]);
    let mut req = request(false, "base.vmdk", None);
    req.old_chain = vec![vmdk(1), vmdk(2)];
    req.in_chain = Some(1);
    safe_case(
        &dir,
        &q,
        &["top.vmdk", "mid.vmdk", "base.vmdk"],
        req.clone(),
        Some("base.vmdk"),
    );
    // Only the grains mid.vmdk changed were copied: 64k..192k minus top's own 128k,
    // and the grain at 2M.
    let out = Scratch::copy_of(&dir, "vmdk-safe-inchain-stats");
    match run_vmdk(&out, &["top.vmdk", "mid.vmdk", "base.vmdk"], req).resp {
        Response::Rebase(o) => assert_eq!(o.stats.clusters_copied, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn safe_refuses_a_stale_parent_cid() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-safe-stale");
    family(&dir, &q, "1M");
    // vb changes CID when written again; vo's parentCID is then stale.
    io(&dir, &q, "vb.vmdk", &["write -P 0x77 512k 4k"]);
    let mut req = request(false, "vb2.vmdk", None);
    req.old_chain = vec![vmdk(1)];
    req.new_chain = vec![vmdk(2)];
    let r = run_vmdk(&dir, &["vo.vmdk", "vb.vmdk", "vb2.vmdk"], req);
    expect_err(&r, ErrorKind::Plain, "parentCID");
}

#[test]
fn safe_refuses_an_old_chain_the_overlay_does_not_name() {
    let Some(q) = qemu_img() else { return };
    let dir = Scratch::new("vmdk-safe-chain");
    family(&dir, &q, "1M");
    // vo names vb, but no old chain is given: its data would become zeros.
    let mut req = request(false, "vb2.vmdk", None);
    req.new_chain = vec![vmdk(1)];
    let r = run_vmdk(&dir, &["vo.vmdk", "vb2.vmdk"], req);
    expect_err(&r, ErrorKind::Plain, "old chain");
    // vb names no parent, but an old chain is given.
    let mut req = request(false, "", None);
    req.old_chain = vec![vmdk(1)];
    let r = run_vmdk(&dir, &["vb.vmdk", "vb2.vmdk"], req);
    expect_err(&r, ErrorKind::Plain, "old chain");
}
