//! Crash consistency of a safe rebase of a LUKS-encrypted qcow2 overlay (the secret
//! through `--object`, the overlay through `--image-opts`): the sandbox is stopped
//! right after its k-th write for every k from 0 to the number of writes n of a full
//! run, and every power-loss state (any subset of the writes after the last completed
//! flush, see `power_loss/mod.rs`) is built from the recorded writes. Each image left
//! behind must pass `qemu-img check` with the secret (leaked clusters allowed) and read,
//! decrypted, exactly as the overlay did before the rebase (`qemu-img compare` with the
//! secret). The same protocol as plain qcow2 (docs/crash-safety.md): encryption changes
//! the bytes of data clusters, not the order of writes and flushes.
//!
//! qemu-img 11.1 makes the fixture and judges the results (10.2.2's build has no crypto
//! library). Without /dev/kvm or that build the test prints a note and passes, unless
//! INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

mod power_loss;
mod qemu;
mod stopping_guest;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use instar_testkit::luks::{create, crypto_builds, image_opts, qio, secret};
use instar_testkit::qemu_ref::Build;
use instar_testkit::{require_kvm, run_in, serial, Scratch};
use instar_vmm::BlockOp;
use stopping_guest::{rebase, stopping_at, StoppingGuest};

const PASS: &str = "crash-test-pass";

/// The fixture: old and new plain backings that differ, and an encrypted overlay over
/// the old one with a few clusters of its own; `extra` creation options for the
/// overlay, and `scale` (a power of two) divides every offset and length.
fn fixture(b: &Build, dir: &Path, extra: &str, scale: u64) {
    let w = |p: u8, off_k: u64, len_k: u64| {
        format!("write -P {p:#x} {}k {}k", off_k / scale, len_k / scale)
    };
    let old = [w(0x11, 0, 1024), w(0x12, 2048, 512)];
    let new = [w(0x11, 0, 512), w(0x21, 768, 1024)];
    for (n, cmds) in [("old.qcow2", &old), ("new.qcow2", &new)] {
        let out = run_in(&b.img, &["create", "-q", "-f", "qcow2", n, "4M"], dir);
        assert_eq!(out.status, 0, "{}", out.stderr);
        for c in cmds {
            let out = run_in(&b.io, &["-f", "qcow2", "-c", c, n], dir);
            assert_eq!(out.status, 0, "{}", out.stderr);
        }
    }
    create(
        b,
        dir,
        "ovl.qcow2",
        "4M",
        PASS,
        extra,
        &["-b", "old.qcow2", "-F", "qcow2"],
    );
    let spec = image_opts("ovl.qcow2", "");
    let own = [w(0x33, 64, 64), w(0x34, 2304, 128)];
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    qio(b, dir, &[secret("s", PASS)], &spec, &own);
}

fn spec_of(path: &Path) -> String {
    image_opts(path.to_str().expect("UTF-8 scratch path"), "")
}

/// `qemu-img check` with the secret: clean or leaks only.
fn check(b: &Build, work: &Path) -> Result<&'static str, String> {
    let sec = secret("s", PASS);
    let out = run_in(
        &b.img,
        &["check", "--object", &sec, "--image-opts", &spec_of(work)],
        Path::new("/"),
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    match out.status {
        0 => Ok("clean"),
        3 if text.contains("leaked clusters") && !text.contains("ERROR") => Ok("leaks"),
        s => Err(format!("qemu-img check: exit {s}\n{text}")),
    }
}

/// `qemu-img compare` with the original overlay, both decrypted.
fn same_content(b: &Build, orig: &Path, work: &Path) -> Result<(), String> {
    let sec = secret("s", PASS);
    let out = run_in(
        &b.img,
        &[
            "compare",
            "--object",
            &sec,
            "--image-opts",
            &spec_of(orig),
            &spec_of(work),
        ],
        Path::new("/"),
    );
    if out.status == 0 {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare: exit {}\n{}{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

fn run_rebase(dir: &Path, work: &Path, guest: StoppingGuest) -> (i32, StoppingGuest) {
    let sec = secret("s", PASS);
    let new = dir.join("new.qcow2");
    let new = new.to_str().expect("UTF-8 scratch path");
    let args = [
        "--object",
        &sec,
        "--image-opts",
        "-q",
        "-b",
        new,
        "-F",
        "qcow2",
    ];
    rebase(&args, Path::new(&spec_of(work)), guest)
}

/// One scenario's fixed parts.
struct Run<'a> {
    b: &'a Build,
    dir: &'a Path,
    orig: &'a Path,
    work: &'a Path,
    original: &'a [u8],
}

impl Run<'_> {
    /// `qemu-img check` and `compare` of the work image, as one verdict.
    fn judge(&self) -> Result<(), String> {
        check(self.b, self.work)
            .map(drop)
            .and_then(|_| same_content(self.b, self.orig, self.work))
    }
}

/// The full run, recorded: one VM writes, to one device. Returns its log, the device
/// and the file it left.
fn full_run(r: &Run<'_>) -> (Vec<BlockOp>, usize, Vec<u8>) {
    let recording = StoppingGuest {
        record: true,
        ..StoppingGuest::default()
    };
    let (status, guest) = run_rebase(r.dir, r.work, recording);
    assert_eq!(status, 0, "the full rebase failed");
    let writing: Vec<usize> = (0..guest.writes.len())
        .filter(|&i| guest.writes[i] > 0)
        .collect();
    assert_eq!(writing.len(), 1, "writes per VM: {:?}", guest.writes);
    let log: Vec<BlockOp> = guest.logs[writing[0]].clone();
    let device = log
        .iter()
        .find_map(|op| match op {
            BlockOp::Write { device, .. } => Some(*device),
            BlockOp::Flush { .. } => None,
        })
        .expect("the full run wrote");
    assert_eq!(check(r.b, r.work), Ok("clean"));
    same_content(r.b, r.orig, r.work).unwrap();
    (log, device, fs::read(r.work).unwrap())
}

/// Stop after every write k; returns each write's bytes.
fn stops(
    r: &Run<'_>,
    extents: &[(u64, u64)],
    failures: &mut Vec<String>,
) -> Vec<power_loss::Write> {
    let mut writes = Vec::new();
    for k in 0..=extents.len() as u64 {
        fs::write(r.work, r.original).unwrap();
        let (status, guest) = run_rebase(r.dir, r.work, stopping_at(k));
        if status != 1 || guest.stopped != Some(k) {
            failures.push(format!("k={k}: exit {status}, stopped {:?}", guest.stopped));
            continue;
        }
        let now = fs::read(r.work).unwrap();
        if k > 0 {
            let (offset, len) = extents[k as usize - 1];
            let bytes = now[offset as usize..(offset + len) as usize].to_vec();
            writes.push(power_loss::Write { offset, bytes });
        }
        if let Err(e) = r.judge() {
            failures.push(format!("k={k}: {e}"));
        }
    }
    writes
}

/// Every power-loss state; returns how many distinct images were judged.
fn power_losses(
    r: &Run<'_>,
    writes: &[power_loss::Write],
    epochs: &[std::ops::Range<usize>],
    failures: &mut Vec<String>,
) -> usize {
    let mut seen = HashSet::new();
    let mut base = r.original.to_vec();
    for (e, epoch) in epochs.iter().enumerate() {
        for subset in power_loss::subsets(epoch.len(), 0x1c5_0000 + e as u64) {
            let mut image = base.clone();
            for &i in &subset {
                power_loss::apply(&mut image, &writes[epoch.start + i]);
            }
            if !seen.insert(power_loss::digest(&image)) {
                continue;
            }
            fs::write(r.work, &image).unwrap();
            if let Err(err) = r.judge() {
                failures.push(format!("epoch {e}, writes {subset:?} of {epoch:?}: {err}"));
            }
        }
        for w in &writes[epoch.clone()] {
            power_loss::apply(&mut base, w);
        }
    }
    seen.len()
}

fn scenario(name: &str, extra: &str, scale: u64) {
    let _serial = serial();
    let Some(builds) = crypto_builds() else {
        return;
    };
    if !require_kvm() {
        return;
    }
    let b = &builds[0];
    let scratch = Scratch::new(&format!("crash-luks-{name}"));
    let dir = scratch.0.clone();
    fixture(b, &dir, extra, scale);
    let orig = dir.join("orig.qcow2");
    fs::copy(dir.join("ovl.qcow2"), &orig).unwrap();
    let original = fs::read(&orig).unwrap();
    let work = dir.join("ovl.qcow2");
    let r = Run {
        b,
        dir: &dir,
        orig: &orig,
        work: &work,
        original: &original,
    };
    let (log, device, full) = full_run(&r);
    let extents = power_loss::write_extents(&log, device);
    let n = extents.len();
    assert!(n > 4, "{name}: too few writes to test: {n}");
    let mut failures = Vec::new();
    let writes = stops(&r, &extents, &mut failures);
    assert!(
        failures.is_empty(),
        "{name}: {} of {} stops fail:\n{}",
        failures.len(),
        n + 1,
        failures.join("\n")
    );
    // The recorded writes replayed on the original give the full run's file.
    let mut replay = original.clone();
    for w in &writes {
        power_loss::apply(&mut replay, w);
    }
    assert!(
        replay.len() >= full.len() && replay[..full.len()] == full[..],
        "{name}: replay differs"
    );
    let epochs = power_loss::epochs(&log, device);
    let states = power_losses(&r, &writes, &epochs, &mut failures);
    eprintln!(
        "{name}: {n} writes, {} epochs (largest {} writes), {states} power-loss states",
        epochs.len(),
        epochs.iter().map(|e| e.len()).max().unwrap_or(0)
    );
    assert!(
        failures.is_empty(),
        "{name}: {} power-loss states fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn encrypted_safe_rebase_64k_clusters() {
    scenario("luks-64k", "", 1);
}

/// 512-byte clusters: new L2 tables and refcount blocks among the encrypted data (the
/// data scaled down 16 times to keep the stops few).
#[test]
fn encrypted_safe_rebase_512_byte_clusters() {
    scenario("luks-512", ",cluster_size=512", 16);
}
