//! One crash scenario run end to end: the rebase in full (recording its writes and
//! flushes), stopped after every write, and every power-loss state of the record (see
//! the parent module), each image checked with `qemu-img check` and `qemu-img compare`.
//! Shared by the crash tests of every overlay format (`crash.rs`, `crash_qed.rs`); the
//! protocol they hold the guest to is described in docs/crash-safety.md.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use instar_testkit::{require_kvm, serial};
use instar_vmm::BlockOp;

use crate::qemu::{self, Fx, Qemu, Scratch};
use crate::stopping_guest::{rebase, stopping_at, StoppingGuest};

fn qemu_img(q: &Qemu, args: &[&str], cwd: &Path) -> qemu::Output {
    qemu::run(&q.img, args, cwd)
}

/// Whether QEMU repairs the image when it opens it read-write: a qcow2 image with the
/// dirty bit (bit 0 of the incompatible features: refcounts may be stale, lazy
/// refcounts), or a qed image with `QED_F_NEED_CHECK` (0x02 in the features at byte 16:
/// not closed cleanly, tables may name clusters past the end of the file).
pub fn repaired_on_open(fmt: &str, image: &[u8]) -> bool {
    match fmt {
        "qcow2" => image.len() >= 80 && image[79] & 1 != 0 && image[4..8] == [0, 0, 0, 3],
        "qed" => image.len() >= 24 && image[..4] == *b"QED\0" && image[16] & 2 != 0,
        _ => false,
    }
}

/// The verdict of `qemu-img check`: clean, or leaked clusters and nothing else.
fn verdict(out: &qemu::Output) -> Option<&'static str> {
    let text = format!("{}{}", out.stdout, out.stderr);
    let leaks_only = out.status == 3
        && text.contains("leaked clusters")
        && !text.contains("ERROR")
        && !text.contains("errors were found");
    match out.status {
        0 => Some("clean"),
        _ if leaks_only => Some("leaks"),
        _ => None,
    }
}

/// The name of the repaired copy [`check`] leaves for a qed image it had to repair.
pub fn repaired_copy(name: &str) -> String {
    format!("{name}.repair")
}

/// Whether `qemu-img check` accepts the image: clean, or leaks only. An image that
/// QEMU repairs when it opens it read-write ([`repaired_on_open`]) may instead come out
/// of `qemu-img check -r all` (on a copy) with no error left (qcow2: clean; qed, whose
/// repair leaves leaks alone: clean or leaks only). For qed the repaired copy stays, as
/// [`repaired_copy`], for [`same_content`]: a read-only open of the unrepaired image
/// fails on a table entry past the end of the file.
pub fn check(q: &Qemu, dir: &Path, name: &str) -> Result<&'static str, String> {
    let fmt = fmt_of(name);
    // A copy left by an earlier image would stand in for this one in `same_content`.
    let _ = fs::remove_file(dir.join(repaired_copy(name)));
    let out = qemu_img(q, &["check", "-f", fmt, name], dir);
    let text = format!("{}{}", out.stdout, out.stderr);
    if let Some(v) = verdict(&out) {
        return Ok(v);
    }
    let bytes = fs::read(dir.join(name)).map_err(|e| e.to_string())?;
    if !repaired_on_open(fmt, &bytes) {
        return Err(format!("qemu-img check: exit {}\n{text}", out.status));
    }
    let copy = repaired_copy(name);
    fs::write(dir.join(&copy), &bytes).map_err(|e| e.to_string())?;
    let fixed = qemu_img(q, &["check", "-r", "all", "-f", fmt, &copy], dir);
    let again = qemu_img(q, &["check", "-f", fmt, &copy], dir);
    let repaired = match fmt {
        "qed" => verdict(&fixed).is_some() && verdict(&again).is_some(),
        _ => fixed.status == 0 && again.status == 0,
    };
    if fmt != "qed" {
        let _ = fs::remove_file(dir.join(&copy));
    }
    if repaired {
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
/// `name`, or with its repaired copy when [`check`] made one (qed).
pub fn same_content(q: &Qemu, dir: &Path, name: &str) -> Result<(), String> {
    let fmt = fmt_of(name);
    let orig = format!("orig.{fmt}");
    let copy = repaired_copy(name);
    let repaired = fmt == "qed" && dir.join(&copy).exists();
    let subject = if repaired { copy.as_str() } else { name };
    let out = qemu_img(q, &["compare", "-f", fmt, "-F", fmt, &orig, subject], dir);
    if repaired {
        let _ = fs::remove_file(dir.join(&copy));
    }
    if out.status == 0 {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare{}: exit {}\n{}{}",
            if repaired { " (after the repair)" } else { "" },
            out.status,
            out.stdout,
            out.stderr
        ))
    }
}

/// The image format of a file name: its extension (`qcow2`, `qed`, `vmdk`).
fn fmt_of(name: &str) -> &'static str {
    if name.ends_with(".vmdk") {
        "vmdk"
    } else if name.ends_with(".qed") {
        "qed"
    } else {
        "qcow2"
    }
}

/// What a scenario runs: `instar rebase ARGS ovl.FMT` over a fixture of `old.FMT`,
/// `new.FMT` and `ovl.FMT`.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub fmt: &'static str,
    pub args: &'static [&'static str],
}

impl Case {
    /// A safe-mode qcow2 rebase onto new.qcow2.
    pub fn safe(name: &'static str) -> Case {
        Case {
            name,
            fmt: "qcow2",
            args: &["-b", "new.qcow2", "-F", "qcow2"],
        }
    }

    pub fn ovl(&self) -> String {
        format!("ovl.{}", self.fmt)
    }
}

/// What one scenario found.
#[derive(Debug, Default)]
pub struct Summary {
    pub writes: u64,
    pub clean: usize,
    pub leaks: usize,
    pub repaired: usize,
    /// Flush barriers that split the writes into epochs.
    pub epochs: usize,
    /// Writes in the largest epoch.
    pub largest_epoch: usize,
    /// Distinct power-loss images (some of them equal to a stop point's image).
    pub power_distinct: usize,
    /// Power-loss images checked: those not byte-identical to an image checked before
    /// (a stop point, or another power-loss state).
    pub power_states: usize,
    /// Stop points and power-loss states whose image was byte-identical to one checked
    /// before, so not checked again.
    pub skipped: usize,
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
pub struct Run<'a> {
    q: &'a Qemu,
    scratch: &'a Scratch,
    case: &'a Case,
    original: &'a [u8],
}

/// The full run's record: the device the writing VM wrote, and its writes and flushes.
pub struct Recorded {
    pub device: usize,
    pub log: Vec<BlockOp>,
}

/// Build the fixture (old, new and ovl.FMT) with `build`, run the rebase in full while
/// recording its writes and flushes, then once per k in 0..=n with a stop after write k,
/// then every power-loss state the record allows (see [`power_loss`]).
pub fn crash_every_write(case: &Case, build: &dyn Fn(&Fx)) -> Option<Summary> {
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
    let extents = super::write_extents(&rec.log, rec.device);
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
    // Digests of the images checked so far: a later image with the same bytes would
    // get the same verdicts (the checks see nothing but the file and the fixture).
    let mut seen = HashSet::new();
    let writes = stop_points(&run, &extents, &mut seen, &mut sum, &mut failures);
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
    let epochs = super::epochs(&rec.log, rec.device);
    power_loss_states(&run, &writes, &epochs, &mut seen, &mut sum, &mut failures);
    eprintln!(
        "{}: {} epochs between flushes (largest {} writes); {} distinct power-loss images, \
         {} of them checked, {} images identical to one checked before, {} failures",
        name,
        epochs.len(),
        epochs.iter().map(|e| e.len()).max().unwrap_or(0),
        sum.power_distinct,
        sum.power_states,
        sum.skipped,
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
pub fn show_log(log: &[BlockOp]) -> String {
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
pub fn full_run(q: &Qemu, scratch: &Scratch, case: &Case) -> Recorded {
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
        super::write_extents(&log, devices[0]).len() as u64,
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
fn replay_matches_full_run(run: &Run<'_>, writes: &[super::Write]) {
    let mut image = run.original.to_vec();
    for w in writes {
        super::apply(&mut image, w);
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
    seen: &mut HashSet<u64>,
    sum: &mut Summary,
    failures: &mut Vec<String>,
) -> Vec<super::Write> {
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
                Some(bytes) => writes.push(super::Write {
                    offset,
                    bytes: bytes.to_vec(),
                }),
                None => failures.push(format!("k={k}: write {offset:#x}+{len:#x} missing")),
            }
        }
        if std::env::var_os("INSTAR_KEEP_SCRATCH").is_some() {
            // Every stop's image, to see what each write changed.
            let _ = fs::copy(&work, scratch.root().join(format!("stop-{k}.{}", case.fmt)));
        }
        if !seen.insert(super::digest(&now)) {
            sum.skipped += 1;
            continue;
        }
        match check(q, &dir, &ovl) {
            Ok(v) => sum.count(v),
            Err(e) => failures.push(format!("k={k}: {e}")),
        }
        if let Err(e) = same_content(q, &dir, &ovl) {
            failures.push(format!("k={k}: {e}"));
        }
    }
    writes
}

/// Every power-loss state: the original image, every write of the epochs before one
/// epoch, and each chosen subset of that epoch's writes (see [`super::subsets`]).
/// Each distinct image must pass [`check`] and read as before the rebase.
fn power_loss_states(
    run: &Run<'_>,
    writes: &[super::Write],
    epochs: &[std::ops::Range<usize>],
    seen: &mut HashSet<u64>,
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
    let mut base = original.to_vec();
    let mut distinct = HashSet::new();
    sum.epochs = epochs.len();
    sum.largest_epoch = epochs.iter().map(|e| e.len()).max().unwrap_or(0);
    for (e, epoch) in epochs.iter().enumerate() {
        for subset in super::subsets(epoch.len(), 0x0014_57a2 + e as u64) {
            let mut image = base.clone();
            for &i in &subset {
                super::apply(&mut image, &writes[epoch.start + i]);
            }
            let digest = super::digest(&image);
            if distinct.insert(digest) {
                sum.power_distinct += 1;
            }
            if !seen.insert(digest) {
                sum.skipped += 1;
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
            super::apply(&mut base, w);
        }
    }
}
