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
//! the limit to the sandbox; `power_loss/scenario.rs` runs each scenario (shared with
//! the qed crash tests, `crash_qed.rs`). An image byte-identical to one already checked
//! in the same scenario is not checked again. Without /dev/kvm or qemu-img 10.2 the tests print a note and
//! pass, unless INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

mod power_loss;
mod qemu;
mod stopping_guest;

use std::fs;

use instar::sandbox::{self, Device, Options, SandboxError};
use instar_abi::{Call, Request, Response, SelfTest};
use instar_testkit::{require_kvm, serial, ScratchFile};
use instar_vmm::BlockOp;
use power_loss::scenario::{
    check, crash_every_write, full_run, repaired_on_open, same_content, show_log, Case, Summary,
};
use qemu::{Fx, Scratch};
use stopping_guest::{rebase, StoppingGuest};

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
        assert!(
            repaired_on_open("qcow2", &fx.read("ovl.qcow2")),
            "the fixture must be dirty"
        );
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

/// `-c`: the copied clusters are compressed and packed several to a host cluster
/// (refcounts above 1), with uncompressed fallbacks in between.
fn compressed(name: &'static str) -> Case {
    Case {
        name,
        fmt: "qcow2",
        args: &["-c", "-b", "new.qcow2", "-F", "qcow2"],
    }
}

#[test]
fn crash_compressed_zlib_64k_clusters() {
    crash_every_write(&compressed("c-zlib-64k"), &|fx| {
        clusters_64k(fx, true, "cluster_size=64k");
        // Incompressible data in the old backing: written uncompressed between the
        // packed clusters.
        fx.io("qcow2", "old.qcow2", &["write -s /proc/self/exe 2560k 64k"]);
    });
}

#[test]
fn crash_compressed_zstd_512_byte_clusters() {
    let Some(sum) = crash_every_write(&compressed("c-zstd-512"), &|fx| {
        clusters_512(fx, true, ",compression_type=zstd")
    }) else {
        return;
    };
    // New L2 tables and refcount blocks between the packed clusters: many writes.
    assert!(sum.writes >= 20, "only {} writes", sum.writes);
}

#[test]
fn crash_compressed_lazy_refcounts() {
    crash_every_write(&compressed("c-lazy"), &|fx| {
        clusters_64k(
            fx,
            true,
            "cluster_size=64k,lazy_refcounts=on,compression_type=zstd",
        )
    });
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
