//! Crash consistency of rebase (safe mode on qcow2 in many layouts; safe mode on vmdk;
//! unsafe mode on both, onto a copy of the old backing): the sandbox is stopped right
//! after its k-th write (the VMM's test-only `stop_after_writes` fault injection, reached
//! through `instar::sandbox::Options`; the `instar` binary never sets it), for every k
//! from 0 to the number of writes n of a full run. After each stop the overlay must pass
//! `qemu-img check` (leaks allowed, no corruption; with lazy refcounts, an image left
//! dirty must be repairable by the check QEMU runs when it opens it) and read exactly as
//! before the rebase (`qemu-img compare` with a copy of the original overlay, which still
//! names the old backing: the stopped overlay names the old backing until the final
//! header (or vmdk descriptor) write and the new one after it, and reads the same either
//! way).
//!
//! Power-loss states go further: a stop after write k models a crash of the process,
//! whose writes all reach the file; a power loss may also drop writes that were issued
//! after the last completed flush. The full run records every write request (offset,
//! length) and flush (the VMM's test-only `record_writes`); the stop after write k
//! supplies that write's bytes. For each epoch of writes between two flushes, the
//! original image plus every earlier write plus a subset of the epoch's writes (every
//! subset of at most 8 writes, otherwise every prefix and 64 seeded subsets; see
//! `power_loss/mod.rs`) must pass the same two checks. The protocol these tests hold the
//! guest to is described in docs/crash-safety.md.
//!
//! The rebase runs in-process through `instar::cli::run` with a [`Guest`] that passes
//! the limit to the sandbox. Without /dev/kvm or qemu-img 10.2 the tests print a note and
//! pass, unless INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

mod power_loss;
mod qemu;
mod stopping_guest;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use instar::sandbox::{self, Device, Options, SandboxError};
use instar_abi::{Call, Request, Response, SelfTest};
use instar_testkit::{require_kvm, serial, ScratchFile};
use instar_vmm::BlockOp;
use qemu::{Fx, Qemu, Scratch};
use stopping_guest::{rebase, stopping_at, StoppingGuest};

fn qemu_img(q: &Qemu, args: &[&str], cwd: &Path) -> qemu::Output {
    qemu::run(&q.img, args, cwd)
}

/// Bit 0 of the qcow2 incompatible features: refcounts may be stale (lazy refcounts).
fn dirty(image: &[u8]) -> bool {
    image.len() >= 80 && image[79] & 1 != 0 && image[4..8] == [0, 0, 0, 3]
}

/// Whether `qemu-img check` accepts the image: clean, or leaks only. An image whose
/// dirty bit is set may have stale refcounts, which QEMU repairs when it opens it; such
/// an image must come out of `qemu-img check -r all` (on a copy) with no error left.
fn check(q: &Qemu, dir: &Path, name: &str) -> Result<&'static str, String> {
    let fmt = fmt_of(name);
    let out = qemu_img(q, &["check", "-f", fmt, name], dir);
    let text = format!("{}{}", out.stdout, out.stderr);
    let leaks_only = out.status == 3 && text.contains("leaked clusters") && !text.contains("ERROR");
    if out.status == 0 {
        return Ok("clean");
    }
    if leaks_only {
        return Ok("leaks");
    }
    let bytes = fs::read(dir.join(name)).map_err(|e| e.to_string())?;
    if !dirty(&bytes) {
        return Err(format!("qemu-img check: exit {}\n{text}", out.status));
    }
    let copy = format!("{name}.repair");
    fs::write(dir.join(&copy), &bytes).map_err(|e| e.to_string())?;
    let fixed = qemu_img(q, &["check", "-r", "all", "-f", "qcow2", &copy], dir);
    let again = qemu_img(q, &["check", "-f", "qcow2", &copy], dir);
    let _ = fs::remove_file(dir.join(&copy));
    if fixed.status == 0 && again.status == 0 {
        Ok("dirty, repaired on open")
    } else {
        Err(format!(
            "dirty image not repairable: qemu-img check exit {}\n{text}\n\
             check -r all: exit {}\n{}{}",
            out.status, fixed.status, fixed.stdout, fixed.stderr
        ))
    }
}

/// `qemu-img compare` of the original overlay (`orig.FMT`, over the old backing) with
/// `name`.
fn same_content(q: &Qemu, dir: &Path, name: &str) -> Result<(), String> {
    let fmt = fmt_of(name);
    let orig = format!("orig.{fmt}");
    let out = qemu_img(q, &["compare", "-f", fmt, "-F", fmt, &orig, name], dir);
    if out.status == 0 {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare: exit {}\n{}{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

/// The image format of a file name: `vmdk` for `*.vmdk`, else `qcow2`.
fn fmt_of(name: &str) -> &'static str {
    if name.ends_with(".vmdk") {
        "vmdk"
    } else {
        "qcow2"
    }
}

/// What a scenario runs: `instar rebase ARGS ovl.FMT` over a fixture of `old.FMT`,
/// `new.FMT` and `ovl.FMT`.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    fmt: &'static str,
    args: &'static [&'static str],
}

impl Case {
    /// A safe-mode qcow2 rebase onto new.qcow2.
    fn safe(name: &'static str) -> Case {
        Case {
            name,
            fmt: "qcow2",
            args: &["-b", "new.qcow2", "-F", "qcow2"],
        }
    }

    fn ovl(&self) -> String {
        format!("ovl.{}", self.fmt)
    }
}

/// What one scenario found.
#[derive(Debug, Default)]
struct Summary {
    writes: u64,
    clean: usize,
    leaks: usize,
    repaired: usize,
    /// Flush barriers that split the writes into epochs.
    epochs: usize,
    /// Writes in the largest epoch.
    largest_epoch: usize,
    /// Distinct power-loss images checked.
    power_states: usize,
}

impl Summary {
    fn count(&mut self, verdict: &str) {
        match verdict {
            "clean" => self.clean += 1,
            "leaks" => self.leaks += 1,
            _ => self.repaired += 1,
        }
    }
}

/// One scenario's fixed parts: the reference qemu-img, the scratch directory holding the
/// fixture, what runs, and the overlay before the rebase.
#[derive(Clone, Copy)]
struct Run<'a> {
    q: &'a Qemu,
    scratch: &'a Scratch,
    case: &'a Case,
    original: &'a [u8],
}

/// The full run's record: the device the writing VM wrote, and its writes and flushes.
struct Recorded {
    device: usize,
    log: Vec<BlockOp>,
}

/// Build the fixture (old, new and ovl.FMT) with `build`, run the rebase in full while
/// recording its writes and flushes, then once per k in 0..=n with a stop after write k,
/// then every power-loss state the record allows (see [`power_loss`]).
fn crash_every_write(case: &Case, build: &dyn Fn(&Fx)) -> Option<Summary> {
    let name = case.name;
    let _serial = serial();
    if !require_kvm() {
        return None;
    }
    let refs = qemu::refs()?;
    let q = &refs.v10_2;
    let scratch = Scratch::new(&format!("crash-{}", name));
    let fx = Fx::new(scratch.fixture(), q);
    build(&fx);
    let ovl = case.ovl();
    fs::copy(fx.path(&ovl), fx.path(&format!("orig.{}", case.fmt))).expect("copy the overlay");
    let original = fx.read(&ovl);

    let rec = full_run(q, &scratch, case);
    if std::env::var_os("INSTAR_CRASH_LOG").is_some() {
        // The write/flush protocol of this scenario, for docs/crash-safety.md.
        eprintln!("{name}: {}", show_log(&rec.log));
    }
    let extents = power_loss::write_extents(&rec.log, rec.device);
    let mut sum = Summary {
        writes: extents.len() as u64,
        ..Summary::default()
    };
    let mut failures = Vec::new();
    let run = Run {
        q,
        scratch: &scratch,
        case,
        original: &original,
    };
    let writes = stop_points(&run, &extents, &mut sum, &mut failures);
    eprintln!(
        "{}: {} writes; stops after k=0..={}: {} clean, {} with leaks, {} dirty and \
         repairable, {} failures",
        name,
        sum.writes,
        sum.writes,
        sum.clean,
        sum.leaks,
        sum.repaired,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{}: {} of {} stop points fail:\n{}",
        name,
        failures.len(),
        sum.writes + 1,
        failures.join("\n")
    );
    replay_matches_full_run(&run, &writes);
    let epochs = power_loss::epochs(&rec.log, rec.device);
    power_loss_states(&run, &writes, &epochs, &mut sum, &mut failures);
    eprintln!(
        "{}: {} epochs between flushes (largest {} writes); {} distinct power-loss \
         images checked, {} failures",
        name,
        epochs.len(),
        epochs.iter().map(|e| e.len()).max().unwrap_or(0),
        sum.power_states,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{}: {} power-loss states fail:\n{}",
        name,
        failures.len(),
        failures.join("\n")
    );
    Some(sum)
}

/// A run's record as text: `W offset+len` per write, `F` per flush.
fn show_log(log: &[BlockOp]) -> String {
    let ops: Vec<String> = log
        .iter()
        .map(|op| match op {
            BlockOp::Write { offset, len, .. } => format!("W {offset:#x}+{len:#x}"),
            BlockOp::Flush { .. } => "F".into(),
        })
        .collect();
    ops.join(" ")
}

/// The rebase in full, recording: exactly one VM writes, to one device; the result is
/// clean and reads as before. Returns that VM's record.
fn full_run(q: &Qemu, scratch: &Scratch, case: &Case) -> Recorded {
    let (name, ovl) = (case.name, case.ovl());
    let dir = scratch.copy("full");
    let recording = StoppingGuest {
        record: true,
        ..StoppingGuest::default()
    };
    let (status, guest) = rebase(case.args, &dir.join(&ovl), recording);
    assert_eq!(status, 0, "{}: the full rebase failed", name);
    let writing: Vec<usize> = (0..guest.writes.len())
        .filter(|&i| guest.writes[i] > 0)
        .collect();
    assert_eq!(
        writing.len(),
        1,
        "{}: exactly one VM must write (writes per VM: {:?})",
        name,
        guest.writes
    );
    let log = guest.logs[writing[0]].clone();
    let mut devices: Vec<usize> = log
        .iter()
        .filter_map(|op| match op {
            BlockOp::Write { device, .. } => Some(*device),
            BlockOp::Flush { .. } => None,
        })
        .collect();
    devices.dedup();
    assert_eq!(
        devices.len(),
        1,
        "{}: writes to devices {:?}",
        name,
        devices
    );
    assert_eq!(
        power_loss::write_extents(&log, devices[0]).len() as u64,
        guest.writes[writing[0]],
        "{}: the record misses writes",
        name
    );
    assert_eq!(check(q, &dir, &ovl), Ok("clean"), "{}", name);
    same_content(q, &dir, &ovl).unwrap_or_else(|e| panic!("{}: {e}", name));
    Recorded {
        device: devices[0],
        log,
    }
}

/// The recorded writes (extents from the full run, bytes from the stops) applied to the
/// original overlay give the full run's file: the stopped runs wrote what the full run
/// wrote. The host may have truncated the sector padding past the image's end.
fn replay_matches_full_run(run: &Run<'_>, writes: &[power_loss::Write]) {
    let mut image = run.original.to_vec();
    for w in writes {
        power_loss::apply(&mut image, w);
    }
    let path = run.scratch.root().join("full").join(run.case.ovl());
    let full = fs::read(path).expect("read the full run's overlay");
    assert!(
        image.len() >= full.len() && image[..full.len()] == full[..],
        "{}: replaying the recorded writes does not give the full run's file ({})",
        run.case.name,
        qemu::describe_diff(&full, &image).unwrap_or_default()
    );
}

/// Stop after every write k in 0..=n and check the image left behind. Returns the
/// bytes of each write (write k's extent in the image stopped right after it).
fn stop_points(
    run: &Run<'_>,
    extents: &[(u64, u64)],
    sum: &mut Summary,
    failures: &mut Vec<String>,
) -> Vec<power_loss::Write> {
    let Run {
        q,
        scratch,
        case,
        original,
    } = *run;
    let dir = scratch.copy("crash");
    let ovl = case.ovl();
    let work = dir.join(&ovl);
    let n = extents.len() as u64;
    let mut writes = Vec::new();
    for k in 0..=n {
        fs::write(&work, original).expect("reset the overlay");
        let (status, guest) = rebase(case.args, &work, stopping_at(k));
        if status != 1 || guest.stopped != Some(k) {
            failures.push(format!(
                "k={k}: expected a stop after {k} writes, got exit {status}, stopped {:?}",
                guest.stopped
            ));
            continue;
        }
        let now = fs::read(&work).expect("read the overlay");
        if k == 0 && now != original {
            failures.push("k=0: the overlay changed without any write".into());
        }
        if k > 0 {
            let (offset, len) = extents[k as usize - 1];
            let range = offset as usize..(offset + len) as usize;
            match now.get(range) {
                Some(bytes) => writes.push(power_loss::Write {
                    offset,
                    bytes: bytes.to_vec(),
                }),
                None => failures.push(format!("k={k}: write {offset:#x}+{len:#x} missing")),
            }
        }
        match check(q, &dir, &ovl) {
            Ok(v) => sum.count(v),
            Err(e) => failures.push(format!("k={k}: {e}")),
        }
        if let Err(e) = same_content(q, &dir, &ovl) {
            failures.push(format!("k={k}: {e}"));
        }
        if std::env::var_os("INSTAR_KEEP_SCRATCH").is_some() {
            // Every stop's image, to see what each write changed.
            let _ = fs::copy(&work, scratch.root().join(format!("stop-{k}.{}", case.fmt)));
        }
    }
    writes
}

/// Every power-loss state: the original image, every write of the epochs before one
/// epoch, and each chosen subset of that epoch's writes (see [`power_loss::subsets`]).
/// Each distinct image must pass [`check`] and read as before the rebase.
fn power_loss_states(
    run: &Run<'_>,
    writes: &[power_loss::Write],
    epochs: &[std::ops::Range<usize>],
    sum: &mut Summary,
    failures: &mut Vec<String>,
) {
    let Run {
        q,
        scratch,
        case,
        original,
    } = *run;
    let dir = scratch.copy("power");
    let ovl = case.ovl();
    let work = dir.join(&ovl);
    let mut seen = HashSet::new();
    let mut base = original.to_vec();
    sum.epochs = epochs.len();
    sum.largest_epoch = epochs.iter().map(|e| e.len()).max().unwrap_or(0);
    for (e, epoch) in epochs.iter().enumerate() {
        for subset in power_loss::subsets(epoch.len(), 0x0014_57a2 + e as u64) {
            let mut image = base.clone();
            for &i in &subset {
                power_loss::apply(&mut image, &writes[epoch.start + i]);
            }
            if !seen.insert(power_loss::digest(&image)) {
                continue;
            }
            sum.power_states += 1;
            fs::write(&work, &image).expect("write the power-loss image");
            let what = || {
                let reached: Vec<usize> = subset.iter().map(|i| epoch.start + i + 1).collect();
                format!(
                    "writes 1..={} flushed, then of writes {}..={} only {:?} reached the disk",
                    epoch.start,
                    epoch.start + 1,
                    epoch.end,
                    reached
                )
            };
            match check(q, &dir, &ovl) {
                Ok(v) => sum.count(v),
                Err(err) => failures.push(format!("{}: {err}", what())),
            }
            if let Err(err) = same_content(q, &dir, &ovl) {
                failures.push(format!("{}: {err}", what()));
            }
        }
        for w in &writes[epoch.clone()] {
            power_loss::apply(&mut base, w);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

/// A 4 MiB old backing with a few clusters of data, and a new one that keeps some of
/// them, changes some, drops some and adds some.
fn backings(fx: &Fx) {
    fx.create("qcow2", "old.qcow2", "4M", &[]);
    fx.io(
        "qcow2",
        "old.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x12 128k 128k",
            "write -P 0x13 1M 64k",
            "write -P 0x14 3076k 4k",
            "write -P 0x15 3584k 192k",
        ],
    );
    fx.create("qcow2", "new.qcow2", "4M", &[]);
    fx.io(
        "qcow2",
        "new.qcow2",
        &[
            // Same as old.
            "write -P 0x11 0 64k",
            "write -P 0x14 3076k 4k",
            // Changed, partly.
            "write -P 0x12 128k 64k",
            "write -P 0x22 192k 64k",
            // Only in the new backing: the overlay must get zeros there.
            "write -P 0x25 2M 64k",
            // Changed in one sector of a cluster.
            "write -P 0x15 3584k 192k",
            "write -P 0x26 3648k 512",
        ],
    );
}

/// The overlay's own data: whole clusters, a partial cluster over a changed range, and
/// data over a range the rebase would otherwise copy.
fn overlay_data(fx: &Fx) {
    fx.io(
        "qcow2",
        "ovl.qcow2",
        &[
            "write -P 0x31 64k 64k",
            "write -P 0x32 196k 4k",
            "write -P 0x33 1M 64k",
            "write -P 0x34 3M 8k",
        ],
    );
}

/// The overlay over old.qcow2 (`old`) or without a backing file, with `opts`.
fn overlay(fx: &Fx, old: bool, opts: &str) {
    let mut o = Vec::new();
    if old {
        o.extend_from_slice(&["-b", "old.qcow2", "-F", "qcow2"]);
    }
    o.extend_from_slice(&["-o", opts]);
    fx.create("qcow2", "ovl.qcow2", "4M", &o);
}

fn clusters_64k(fx: &Fx, old: bool, opts: &str) {
    backings(fx);
    overlay(fx, old, opts);
    overlay_data(fx);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// 512-byte clusters: an L2 table maps 32 KiB and a refcount block covers 128 KiB of
/// file, so the differences spread over the disk need new L2 tables and the copied data
/// needs new refcount blocks.
fn clusters_512(fx: &Fx, old: bool, opts: &str) {
    clusters_512_with(fx, old, opts, &[]);
}

/// [`clusters_512`] with more overlay data written by `extra` qemu-io commands.
fn clusters_512_with(fx: &Fx, old: bool, opts: &str, extra: &[&str]) {
    fx.create("qcow2", "old.qcow2", "4M", &[]);
    fx.create("qcow2", "new.qcow2", "4M", &[]);
    let mut old_cmds = Vec::new();
    let mut new_cmds = Vec::new();
    for i in 0..24u64 {
        let at = i * 160 * 1024 + 512 * (i % 5);
        old_cmds.push(format!("write -P {} {at} 8k", 0x40 + i));
        if i % 3 != 0 {
            new_cmds.push(format!("write -P {} {} 2k", 0x80 + i, at + 1024));
        } else {
            new_cmds.push(format!("write -P {} {at} 8k", 0x40 + i));
        }
    }
    fx.io("qcow2", "old.qcow2", &strs(&old_cmds));
    fx.io("qcow2", "new.qcow2", &strs(&new_cmds));
    overlay(fx, old, &format!("cluster_size=512{opts}"));
    let mut cmds = vec!["write -P 0x61 0 1k", "write -P 0x62 1000k 3k"];
    cmds.extend_from_slice(extra);
    fx.io("qcow2", "ovl.qcow2", &cmds);
}

/// A safe-mode qcow2 scenario.
fn run_scenario(name: &'static str, build: impl Fn(&Fx)) -> Option<Summary> {
    crash_every_write(&Case::safe(name), &build)
}

/// Sixteen separate clusters to copy into an existing L2 table: their data writes and
/// the refcount block share one epoch of more than 8 writes, so the power-loss states
/// are every prefix plus 64 seeded subsets.
#[test]
fn crash_many_writes_in_one_epoch() {
    let sum = run_scenario("one-epoch", |fx| {
        fx.create("qcow2", "old.qcow2", "4M", &[]);
        fx.create("qcow2", "new.qcow2", "4M", &[]);
        let old: Vec<String> = (0..16)
            .map(|i| format!("write -P {} {}k 64k", 0x40 + i, i * 192))
            .collect();
        let new: Vec<String> = (0..16)
            .map(|i| format!("write -P {} {}k 4k", 0x80 + i, i * 192 + 8))
            .collect();
        fx.io("qcow2", "old.qcow2", &strs(&old));
        fx.io("qcow2", "new.qcow2", &strs(&new));
        overlay(fx, true, "cluster_size=64k");
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x61 3968k 64k"]);
    });
    if let Some(sum) = sum {
        assert!(
            sum.largest_epoch > power_loss::EXHAUSTIVE,
            "largest epoch {}",
            sum.largest_epoch
        );
    }
}

/// Unsafe mode rewrites the qcow2 header alone. The new backing is a copy of the old
/// one, as when a backing file moves, so the content must not change either.
#[test]
fn crash_unsafe_qcow2() {
    let case = Case {
        name: "unsafe",
        fmt: "qcow2",
        args: &["-u", "-b", "new.qcow2", "-F", "qcow2"],
    };
    let sum = crash_every_write(&case, &|fx| {
        clusters_64k(fx, true, "cluster_size=64k");
        fx.write("new.qcow2", &fx.read("old.qcow2"));
    });
    if let Some(sum) = sum {
        assert_eq!(sum.writes, 1, "unsafe mode writes the header once");
    }
}

/// A monolithicSparse vmdk chain like [`backings`] + [`overlay_data`].
fn vmdk_chain(fx: &Fx) {
    fx.create("vmdk", "old.vmdk", "4M", &[]);
    fx.io(
        "vmdk",
        "old.vmdk",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x12 128k 128k",
            "write -P 0x13 1M 64k",
            "write -P 0x15 3584k 192k",
        ],
    );
    fx.create("vmdk", "new.vmdk", "4M", &[]);
    fx.io(
        "vmdk",
        "new.vmdk",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x12 128k 64k",
            "write -P 0x22 192k 64k",
            "write -P 0x25 2M 64k",
            "write -P 0x15 3584k 192k",
            "write -P 0x26 3648k 512",
        ],
    );
    fx.create("vmdk", "ovl.vmdk", "4M", &["-b", "old.vmdk", "-F", "vmdk"]);
    fx.io(
        "vmdk",
        "ovl.vmdk",
        &[
            "write -P 0x31 64k 64k",
            "write -P 0x32 196k 4k",
            "write -P 0x33 1M 64k",
        ],
    );
}

/// Safe mode on a vmdk overlay: grains copied, grain tables updated, descriptor last.
#[test]
fn crash_safe_vmdk() {
    let case = Case {
        name: "vmdk",
        fmt: "vmdk",
        args: &["-b", "new.vmdk", "-F", "vmdk"],
    };
    if let Some(sum) = crash_every_write(&case, &vmdk_chain) {
        assert!(sum.writes >= 4, "only {} writes", sum.writes);
    }
}

/// Unsafe mode on a vmdk overlay rewrites the descriptor alone; the new parent is a
/// copy of the old one (same CID), so the content must not change.
#[test]
fn crash_unsafe_vmdk() {
    let case = Case {
        name: "unsafe-vmdk",
        fmt: "vmdk",
        args: &["-u", "-b", "new.vmdk", "-F", "vmdk"],
    };
    let sum = crash_every_write(&case, &|fx| {
        vmdk_chain(fx);
        fx.write("new.vmdk", &fx.read("old.vmdk"));
    });
    if let Some(sum) = sum {
        assert_eq!(sum.writes, 1, "unsafe mode writes the descriptor once");
    }
}

#[test]
fn crash_64k_clusters() {
    run_scenario("64k", |fx| clusters_64k(fx, true, "cluster_size=64k"));
}

#[test]
fn crash_512_byte_clusters() {
    let Some(sum) = run_scenario("512", |fx| clusters_512(fx, true, "")) else {
        return;
    };
    // The scenario is meant to allocate L2 tables and refcount blocks: many writes.
    assert!(sum.writes >= 20, "only {} writes", sum.writes);
}

/// 64-bit refcounts: a 512-byte refcount block covers 64 clusters and the one-cluster
/// refcount table 2 MiB of file. The overlay's own data fills the file to just below
/// 2 MiB, so the copied clusters need a larger refcount table.
#[test]
fn crash_refcount_table_growth() {
    let Some(sum) = run_scenario("512-reftable", |fx| {
        clusters_512_with(
            fx,
            true,
            ",refcount_bits=64",
            &["write -P 0x63 2048k 1950k"],
        );
        let ovl = fx.read("ovl.qcow2");
        let reftable_clusters = qemu::be32(&ovl, 56);
        assert_eq!(
            reftable_clusters, 1,
            "the fixture's refcount table already grew"
        );
    }) else {
        return;
    };
    assert!(sum.writes >= 20, "only {} writes", sum.writes);
}

#[test]
fn crash_lazy_refcounts() {
    run_scenario("lazy", |fx| {
        clusters_64k(fx, true, "cluster_size=64k,lazy_refcounts=on")
    });
}

/// A dirty overlay (lazy refcounts, a process killed before its refcounts reached the
/// file): the repair's writes come first, then the rebase's.
#[test]
fn crash_dirty_overlay() {
    run_scenario("dirty", |fx| {
        clusters_64k(fx, true, "cluster_size=64k,lazy_refcounts=on");
        let args = [
            "-f",
            "qcow2",
            "-c",
            "write -P 0x35 2M 128k",
            "-c",
            "sigraise 9",
            "ovl.qcow2",
        ];
        qemu::run(&fx.qemu.io, &args, &fx.dir);
        assert!(dirty(&fx.read("ovl.qcow2")), "the fixture must be dirty");
    });
}

#[test]
fn crash_v2_overlay() {
    run_scenario("v2", |fx| {
        clusters_64k(fx, true, "cluster_size=64k,compat=0.10")
    });
}

#[test]
fn crash_without_old_backing() {
    run_scenario("no-old", |fx| clusters_64k(fx, false, "cluster_size=64k"));
}

#[test]
fn crash_without_old_backing_512_byte_clusters() {
    run_scenario("no-old-512", |fx| clusters_512(fx, false, ""));
}

#[test]
fn crash_without_old_backing_v2() {
    run_scenario("no-old-v2", |fx| {
        clusters_64k(fx, false, "cluster_size=64k,compat=0.10")
    });
}

#[test]
fn crash_without_old_backing_v2_512_byte_clusters() {
    run_scenario("no-old-v2-512", |fx| {
        clusters_512(fx, false, ",compat=0.10")
    });
}

/// The power-loss check can fail: the 64k scenario's first write after its first flush
/// (the L2 table that maps the copied data), on the disk without the writes that flush
/// made durable (data and refcounts), must be refused by `check` or `same_content`.
#[test]
fn a_write_that_overtakes_a_barrier_is_caught() {
    let _serial = serial();
    if !require_kvm() {
        return;
    }
    let Some(refs) = qemu::refs() else {
        return;
    };
    let q = &refs.v10_2;
    let scratch = Scratch::new("crash-overtake");
    let fx = Fx::new(scratch.fixture(), q);
    clusters_64k(&fx, true, "cluster_size=64k");
    fs::copy(fx.path("ovl.qcow2"), fx.path("orig.qcow2")).expect("copy the overlay");
    let original = fx.read("ovl.qcow2");
    let rec = full_run(q, &scratch, &Case::safe("overtake"));
    let done = fs::read(scratch.root().join("full/ovl.qcow2")).expect("read the result");
    let extents = power_loss::write_extents(&rec.log, rec.device);
    let epochs = power_loss::epochs(&rec.log, rec.device);
    assert!(epochs.len() >= 2, "{}", show_log(&rec.log));
    let i = epochs[1].start;
    let (offset, len) = extents[i];
    // Its bytes are in the result unless a later write covers them.
    for &(o, l) in &extents[i + 1..] {
        assert!(
            o >= offset + len || o + l <= offset,
            "write {i} is rewritten"
        );
    }
    let mut image = original.clone();
    let bytes = done[offset as usize..(offset + len) as usize].to_vec();
    power_loss::apply(&mut image, &power_loss::Write { offset, bytes });
    let dir = scratch.copy("overtake");
    fs::write(dir.join("ovl.qcow2"), &image).expect("write the image");
    let checked = check(q, &dir, "ovl.qcow2");
    let same = same_content(q, &dir, "ovl.qcow2");
    assert!(
        checked.is_err() || same.is_err(),
        "write {} ({offset:#x}+{len:#x}) alone passes: {checked:?}",
        i + 1
    );
}

/// The VMM's record grows past its first allocation on the confined vCPU thread: a safe
/// rebase with over 4096 writes (every other 512-byte cluster of a 4 MiB disk differs)
/// runs to the end with every write and flush recorded.
#[test]
fn recording_keeps_every_op_of_a_long_run() {
    let _serial = serial();
    if !require_kvm() {
        return;
    }
    let Some(refs) = qemu::refs() else {
        return;
    };
    let scratch = Scratch::new("crash-long-record");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let old = vec![0x11u8; 4 << 20];
    let mut new = old.clone();
    for sector in new.chunks_mut(1024) {
        sector[..512].fill(0x22);
    }
    fx.write("old.raw", &old);
    fx.write("new.raw", &new);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "4M",
        &["-b", "old.raw", "-F", "raw", "-o", "cluster_size=512"],
    );
    let recording = StoppingGuest {
        record: true,
        ..StoppingGuest::default()
    };
    let args = ["-b", "new.raw", "-F", "raw"];
    let (status, guest) = rebase(&args, &fx.path("ovl.qcow2"), recording);
    assert_eq!(status, 0);
    let (i, &n) = guest
        .writes
        .iter()
        .enumerate()
        .max_by_key(|(_, w)| **w)
        .expect("a VM ran");
    assert!(n > 4096, "only {n} writes");
    let log = &guest.logs[i];
    let writes = log
        .iter()
        .filter(|op| matches!(op, BlockOp::Write { .. }))
        .count();
    assert_eq!(writes as u64, n);
    assert!(log.len() > writes, "no flush recorded");
}

#[test]
fn check_accepts_leaks_and_rejects_corruption() {
    let _serial = serial();
    let Some(refs) = qemu::refs() else {
        return;
    };
    let q = &refs.v10_2;
    let scratch = Scratch::new("crash-check");
    let fx = Fx::new(scratch.fixture(), q);
    fx.create("qcow2", "img.qcow2", "1M", &["-o", "cluster_size=64k"]);
    fx.io("qcow2", "img.qcow2", &["write -P 1 0 64k"]);
    assert_eq!(check(q, &fx.dir, "img.qcow2"), Ok("clean"));
    // The data cluster: L1[0] -> L2[0]; its 16-bit refcount in the first block.
    let img = fx.read("img.qcow2");
    let l1 = qemu::be64(&img, 40) as usize;
    let l2 = (qemu::be64(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = qemu::be64(&img, l2) & 0x00ff_ffff_ffff_fe00;
    let reftable = qemu::be64(&img, 48) as usize;
    let block = qemu::be64(&img, reftable) as usize;
    assert_eq!(qemu::be16(&img, block + 2 * (data >> 16) as usize), 1);
    let set_refcount = |cluster: u64, v: u16| {
        let mut b = img.clone();
        // One more cluster at the end, so that a refcount can leak inside the file.
        b.resize(b.len().next_multiple_of(65536) + 65536, 0);
        let at = block + 2 * cluster as usize;
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
        fx.write("img.qcow2", &b);
        check(q, &fx.dir, "img.qcow2")
    };
    let last = img.len().div_ceil(65536) as u64;
    assert_eq!(set_refcount(last, 1), Ok("leaks"));
    let e = set_refcount(data >> 16, 0).unwrap_err();
    assert!(e.contains("ERROR"), "{e}");
    // The same with the dirty bit set: stale refcounts that QEMU repairs on open.
    let mut b = fx.read("img.qcow2");
    b[79] |= 1;
    fx.write("img.qcow2", &b);
    assert_eq!(
        check(q, &fx.dir, "img.qcow2"),
        Ok("dirty, repaired on open")
    );
}

// ---------------------------------------------------------------------------------------
// The fault injection itself, with the guest's one-sector write self-test.

#[test]
fn stop_after_writes_stops_the_sandbox_at_the_write() {
    let _serial = serial();
    if !require_kvm() {
        return;
    }
    let img = ScratchFile::new("crash-selftest", &[]);
    let before = vec![0x5au8; 4096];
    let call = Call {
        device_sizes: vec![],
        request: Request::SelfTest(SelfTest::Write { dev: 0 }),
    };
    let pattern = b"INSTAR-SELFTEST\n".repeat(32);
    for stop in [None, Some(0), Some(1), Some(2)] {
        fs::write(&img.0, &before).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img.0)
            .unwrap();
        let devs = [Device {
            file: &file,
            writable: true,
        }];
        let opts = Options {
            stop_after_writes: stop,
            ..Options::default()
        };
        let r = sandbox::run_detailed(&call, &devs, &opts, &mut |_| {});
        let after = fs::read(&img.0).unwrap();
        match stop {
            Some(0) => {
                let e = r.unwrap_err();
                assert!(matches!(e, SandboxError::StoppedAfterWrites(0)), "{e:?}");
                assert_eq!(
                    e.to_string(),
                    "sandbox stopped after 0 writes (fault injection)"
                );
                assert_eq!(after, before, "nothing written");
            }
            Some(1) => {
                let e = r.unwrap_err();
                assert!(matches!(e, SandboxError::StoppedAfterWrites(1)), "{e:?}");
                assert_eq!(&after[..512], &pattern[..], "the write landed");
                assert_eq!(&after[512..], &before[512..]);
            }
            // The self-test writes once: a limit above that never triggers.
            _ => {
                let o = r.unwrap();
                assert_eq!(o.response, Response::SelfTest(0));
                assert_eq!(o.writes, 1);
                assert_eq!(&after[..512], &pattern[..]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Persistent bitmaps (docs/bitmaps.md): the open's in-place IN_USE update between two
// header writes, the rebase's own writes, then the store into new clusters, the header
// naming the new directory, and the old clusters freed (data clusters zeroed).

/// The overlay of [`clusters_64k`] (or [`clusters_512`]) with bitmaps added before its
/// data is written: an enabled one at the default granularity, a fine one, a disabled
/// one and one left empty.
fn with_bitmaps(fx: &Fx, small: bool, opts: &str) {
    let bitmap = |args: &[&str]| {
        let mut v = vec!["bitmap"];
        v.extend_from_slice(args);
        fx.img(&v);
    };
    if small {
        clusters_512_with(fx, true, opts, &[]);
    } else {
        backings(fx);
        overlay(fx, true, &format!("cluster_size=64k{opts}"));
    }
    bitmap(&["--add", "ovl.qcow2", "auto"]);
    bitmap(&["--add", "-g", "512", "ovl.qcow2", "fine"]);
    bitmap(&["--add", "ovl.qcow2", "off"]);
    if !small {
        overlay_data(fx);
    } else {
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x64 2M 3k"]);
    }
    bitmap(&["--disable", "ovl.qcow2", "off"]);
    bitmap(&["--add", "ovl.qcow2", "empty"]);
}

#[test]
fn crash_bitmaps_safe() {
    let Some(sum) = run_scenario("bitmaps", |fx| with_bitmaps(fx, false, "")) else {
        return;
    };
    // Open (3 header/directory writes), data, store (data clusters, tables, directory),
    // header, discards: far more than a plain rebase.
    assert!(sum.writes >= 15, "only {} writes", sum.writes);
}

#[test]
fn crash_bitmaps_512_byte_clusters() {
    run_scenario("bitmaps-512", |fx| with_bitmaps(fx, true, ""));
}

#[test]
fn crash_bitmaps_lazy_refcounts() {
    run_scenario("bitmaps-lazy", |fx| {
        with_bitmaps(fx, false, ",lazy_refcounts=on")
    });
}

/// `-u` no longer writes the header alone: QEMU stores the bitmaps again.
#[test]
fn crash_bitmaps_unsafe() {
    let case = Case {
        name: "bitmaps-unsafe",
        fmt: "qcow2",
        args: &["-u", "-b", "new.qcow2", "-F", "qcow2"],
    };
    let sum = crash_every_write(&case, &|fx| {
        with_bitmaps(fx, false, "");
        fx.write("new.qcow2", &fx.read("old.qcow2"));
    });
    if let Some(sum) = sum {
        assert!(sum.writes > 1, "only {} writes", sum.writes);
    }
}
