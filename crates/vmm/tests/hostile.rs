//! The malicious-guest suite: hand-built guests that attack the host through
//! virtio-blk, the doorbell and the clock, run through [`instar_vmm::run`] (so under
//! the real seccomp filters). Each case runs in a child process of its own, so that a
//! process killed by its own filter (SIGSYS) or a panic is seen as such, and a
//! test-only panic hook stays in that process. Every case ends with the child alive and
//! an answer or a clear error; device files are checked byte for byte.
//!
//! Without /dev/kvm these tests print a note and pass, unless INSTAR_REQUIRE_KVM=1.
//! Run them in release builds too: `cargo test --release -p instar-vmm --test hostile`.

#[path = "hostile/asm.rs"]
mod asm;

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use asm::*;
use instar_abi::layout::{DOORBELL_WRITE_END_HIGH, DOORBELL_WRITE_PHASE, VIRTIO_MMIO_BASE};
use instar_abi::{Call, RebaseRequest, Request, Response, SelfTest};
use instar_testkit::{require_kvm, ScratchFile};
use instar_vmm::test_hooks::{self, Site};
use instar_vmm::{run, Config, Device, Error, Outcome};

const CHILD: &str = "INSTAR_HOSTILE_CHILD";

/// Run `case` in a child process (this test binary, filtered to `name`), with
/// `RUST_BACKTRACE=1` so that the panic path is the expensive one; the child must exit
/// on its own, successfully.
fn in_child(name: &str, case: impl FnOnce()) {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        case();
        return;
    }
    if !require_kvm() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.signal(),
        None,
        "the process was killed by signal {:?}:\n{text}",
        out.status.signal()
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the case did not run:\n{text}");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

fn selftest_call(t: SelfTest) -> Call {
    Call {
        device_sizes: vec![],
        request: Request::SelfTest(t),
    }
}

/// Run `guest` with one device over `file`; return the outcome and the PROGRESS values.
fn go(
    guest: Guest,
    call: &Call,
    file: &File,
    writable: bool,
    config: &Config,
) -> (Result<Outcome, Error>, Vec<u32>) {
    let mut seen = Vec::new();
    let devices = [Device { file, writable }];
    let r = run(&guest.elf(), call, &devices, config, &mut |v| seen.push(v));
    (r, seen)
}

fn answered(r: &Result<Outcome, Error>) {
    match r {
        Ok(o) => assert_eq!(o.response, Response::SelfTest(7)),
        Err(e) => panic!("the guest did not answer: {e}"),
    }
}

/// A read of sector 0 into BUF: header at HDR, `data` descriptors as laid out by the
/// caller at `table` from index 1, the status at STATUS (preset to 0xff).
fn status_preset(g: &mut Guest) {
    g.put(STATUS, &[0xff]);
    g.header(HDR, T_IN, 0);
}

/// An indirect table of `entries` descriptors, chained as one read request: header,
/// data segments of 512 bytes, status.
fn indirect_case(entries: u32) {
    let img = ScratchFile::new(&format!("ind{entries}"), &pattern(1 << 20));
    let mut g = Guest::default();
    status_preset(&mut g);
    g.desc(DESC, 0, IND, entries * 16, F_INDIRECT, 0);
    g.desc(IND, 0, HDR, 16, F_NEXT, 1);
    for i in 1..entries - 1 {
        g.desc(IND, i, BUF, 512, F_NEXT | F_WRITE, (i + 1) as u16);
    }
    g.desc(IND, entries - 1, STATUS, 1, F_WRITE, 0);
    g.avail(0, 0);
    g.avail_idx(1);
    g.setup_queue();
    g.notify();
    g.report_used(1);
    g.report(STATUS, 1);
    g.answer(7);
    let (r, seen) = go(
        g,
        &selftest_call(SelfTest::Echo(0)),
        &img.open(false),
        false,
        &Config::default(),
    );
    answered(&r);
    // Served as a failed request: used, length 0, status untouched.
    assert_eq!(seen, [1, 0, 0xff]);
}

#[test]
fn indirect_table_of_8000_entries() {
    in_child("indirect_table_of_8000_entries", || indirect_case(8000));
}

#[test]
fn indirect_table_of_9000_entries() {
    in_child("indirect_table_of_9000_entries", || indirect_case(9000));
}

#[test]
fn indirect_table_of_65535_entries() {
    in_child("indirect_table_of_65535_entries", || indirect_case(65_535));
}

/// Chains of `data` 512-byte data segments (direct, in the 256-entry table).
fn direct_chain(data: u32) -> (Vec<u32>, Vec<u8>) {
    let img = ScratchFile::new(&format!("chain{data}"), &pattern(1 << 20));
    let mut g = Guest::default();
    status_preset(&mut g);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    for i in 1..=data {
        g.desc(
            DESC,
            i,
            BUF + 512 * u64::from(i - 1),
            512,
            F_NEXT | F_WRITE,
            (i + 1) as u16,
        );
    }
    g.desc(DESC, data + 1, STATUS, 1, F_WRITE, 0);
    g.avail(0, 0);
    g.avail_idx(1);
    g.setup_queue();
    g.notify();
    g.report_used(1);
    g.report(STATUS, 1);
    g.report(BUF + 512 * u64::from(data) - 1, 1);
    g.answer(7);
    let (r, seen) = go(
        g,
        &selftest_call(SelfTest::Echo(0)),
        &img.open(false),
        false,
        &Config::default(),
    );
    answered(&r);
    (seen, pattern(1 << 20))
}

#[test]
fn chains_up_to_seg_max_are_served_and_longer_ones_refused() {
    in_child(
        "chains_up_to_seg_max_are_served_and_longer_ones_refused",
        || {
            // 128 segments (seg_max): served.
            let (seen, data) = direct_chain(128);
            assert_eq!(seen, [1, 128 * 512 + 1, 0, u32::from(data[128 * 512 - 1])]);
            // 129: refused, nothing read.
            let (seen, _) = direct_chain(129);
            assert_eq!(seen, [1, 0, 0xff, 0]);
            // 254 (the whole table): refused.
            let (seen, _) = direct_chain(254);
            assert_eq!(seen, [1, 0, 0xff, 0]);
        },
    );
}

#[test]
fn nested_and_looping_indirect_tables() {
    in_child("nested_and_looping_indirect_tables", || {
        let img = ScratchFile::new("nested", &pattern(4096));
        let mut g = Guest::default();
        status_preset(&mut g);
        // Request 0: an indirect entry inside the indirect table.
        g.desc(DESC, 0, IND, 48, F_INDIRECT, 0);
        g.desc(IND, 0, HDR, 16, F_NEXT, 1);
        g.desc(IND, 1, IND, 48, F_INDIRECT, 0);
        // Request 1: a table of 3 entries looping 0 -> 1 -> 2 -> 0.
        let t2 = IND + 0x1000;
        g.desc(DESC, 1, t2, 48, F_INDIRECT, 0);
        g.desc(t2, 0, HDR, 16, F_NEXT, 1);
        g.desc(t2, 1, BUF, 512, F_NEXT | F_WRITE, 2);
        g.desc(t2, 2, STATUS, 1, F_NEXT | F_WRITE, 0);
        // Request 2: a direct loop 2 -> 3 -> 2.
        g.desc(DESC, 2, HDR, 16, F_NEXT, 3);
        g.desc(DESC, 3, STATUS, 1, F_NEXT | F_WRITE, 2);
        // Request 3: an indirect table with NEXT set, pointing at a good request.
        g.desc(DESC, 4, t2, 48, F_INDIRECT | F_NEXT, 5);
        for (k, head) in [0u16, 1, 2, 4].into_iter().enumerate() {
            g.avail(k as u16, head);
        }
        g.avail_idx(4);
        g.setup_queue();
        g.notify();
        g.report_used(4);
        g.report(STATUS, 1);
        g.answer(7);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        answered(&r);
        assert_eq!(seen, [4, 0, 0, 0, 0, 0xff]);
    });
}

#[test]
fn descriptors_at_the_top_of_the_address_space() {
    in_child("descriptors_at_the_top_of_the_address_space", || {
        let img = ScratchFile::new("top", &pattern(4096));
        let mut g = Guest::default();
        status_preset(&mut g);
        // 0: the status byte at u64::MAX with length 2 (its end overflows).
        g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        g.desc(DESC, 1, u64::MAX, 2, F_WRITE, 0);
        // 1: a data buffer ending at u64::MAX.
        g.desc(DESC, 2, HDR, 16, F_NEXT, 3);
        g.desc(DESC, 3, u64::MAX - 511, 512, F_NEXT | F_WRITE, 4);
        g.desc(DESC, 4, STATUS, 1, F_WRITE, 0);
        // 2: the header at the top.
        g.desc(DESC, 5, u64::MAX - 15, 16, F_NEXT, 6);
        g.desc(DESC, 6, STATUS + 1, 1, F_WRITE, 0);
        // 3: an indirect table at the top.
        g.desc(DESC, 7, u64::MAX - 31, 32, F_INDIRECT, 0);
        for (k, head) in [0u16, 2, 5, 7].into_iter().enumerate() {
            g.avail(k as u16, head);
        }
        g.put(STATUS + 1, &[0xff]);
        g.avail_idx(4);
        g.setup_queue();
        g.notify();
        g.report_used(4);
        g.report(STATUS, 1);
        g.report(STATUS + 1, 1);
        g.answer(7);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        answered(&r);
        assert_eq!(seen, [4, 0, 1, 0, 0, u32::from(S_IOERR), 0xff]);
    });
}

#[test]
fn buffers_over_the_rings_and_the_next_request() {
    in_child("buffers_over_the_rings_and_the_next_request", || {
        // The file's first sector, read over the descriptor table, turns request 1
        // into a chain at u64::MAX; its second, read over the avail ring, claims 300
        // more requests.
        let mut file = pattern(4096);
        let mut evil = [0u8; 16];
        evil[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        evil[8..12].copy_from_slice(&512u32.to_le_bytes());
        evil[12..14].copy_from_slice(&(F_NEXT | F_WRITE).to_le_bytes());
        evil[14..].copy_from_slice(&9u16.to_le_bytes());
        for k in 0..32 {
            file[16 * k..16 * k + 16].copy_from_slice(&evil);
        }
        file[512 + 2..512 + 4].copy_from_slice(&302u16.to_le_bytes());
        let img = ScratchFile::new("overlap", &file);
        let mut g = Guest::default();
        status_preset(&mut g);
        // Request 0 (descriptors 32..): read sector 0 over descriptors 0..31.
        g.desc(DESC, 32, HDR, 16, F_NEXT, 33);
        g.desc(DESC, 33, DESC, 512, F_NEXT | F_WRITE, 34);
        g.desc(DESC, 34, STATUS, 1, F_WRITE, 0);
        // Request 1 (descriptor 0..2 before the read).
        g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        g.desc(DESC, 1, BUF, 512, F_NEXT | F_WRITE, 2);
        g.desc(DESC, 2, STATUS + 1, 1, F_WRITE, 0);
        // Request 2: read sector 1 over the avail ring.
        g.header(HDR + 0x40, T_IN, 1);
        g.desc(DESC, 40, HDR + 0x40, 16, F_NEXT, 41);
        g.desc(DESC, 41, AVAIL, 512, F_NEXT | F_WRITE, 42);
        g.desc(DESC, 42, STATUS + 2, 1, F_WRITE, 0);
        g.avail(0, 32);
        g.avail(1, 0);
        g.avail(2, 40);
        g.avail_idx(3);
        g.setup_queue();
        g.notify();
        g.report_used(3);
        g.report(STATUS, 1);
        // Another notify: 299 new requests claimed at once.
        g.notify();
        g.answer(7);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        // Request 1 was rewritten into a chain at u64::MAX: failed, length 0.
        assert_eq!(seen, [3, 513, 0, 513, 0]);
        let err = r.unwrap_err();
        assert!(
            err.to_string()
                .contains("the guest made 299 requests available at once, the queue holds 256"),
            "{err}"
        );
    });
}

/// `count` copies of one read request of a sector in one notify.
fn many_requests(count: u16) -> (Result<Outcome, Error>, Vec<u32>) {
    let img = ScratchFile::new(&format!("many{count}"), &pattern(4096));
    let mut g = Guest::default();
    status_preset(&mut g);
    g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
    g.desc(DESC, 1, BUF, 512, F_NEXT | F_WRITE, 2);
    g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
    for k in 0..QUEUE_SIZE {
        g.avail(k, 0);
    }
    g.avail_idx(count);
    g.setup_queue();
    g.notify();
    g.report(USED + 2, 2);
    g.answer(7);
    go(
        g,
        &selftest_call(SelfTest::Echo(0)),
        &img.open(false),
        false,
        &Config::default(),
    )
}

#[test]
fn a_full_queue_is_served_and_more_ends_the_vm() {
    in_child("a_full_queue_is_served_and_more_ends_the_vm", || {
        let (r, seen) = many_requests(256);
        answered(&r);
        assert_eq!(seen, [256]);
        for count in [257, 1000, u16::MAX] {
            let (r, seen) = many_requests(count);
            assert!(seen.is_empty());
            let err = r.unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "internal error in sandbox: device 0: the guest made {count} requests \
                     available at once"
                )),
                "{err}"
            );
        }
    });
}

#[test]
fn queue_reprogramming_after_ready_is_ignored() {
    in_child("queue_reprogramming_after_ready_is_ignored", || {
        let img = ScratchFile::new("reprogram", &pattern(4096));
        let mut g = Guest::default();
        status_preset(&mut g);
        g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        g.desc(DESC, 1, BUF, 512, F_NEXT | F_WRITE, 2);
        g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
        g.avail(0, 0);
        g.avail_idx(1);
        g.setup_queue();
        // Move every ring out of RAM and grow the queue, after READY.
        g.reg(REG_QUEUE_NUM, 32768);
        g.reg(REG_QUEUE_DESC_LOW, 0xffff_f000);
        g.reg(REG_QUEUE_DESC_LOW + 4, 0xffff_ffff);
        g.reg(REG_QUEUE_DRIVER_LOW, 0xffff_f000);
        g.reg(REG_QUEUE_DEVICE_LOW + 4, 0xffff_ffff);
        g.notify();
        g.report_used(1);
        g.report(STATUS, 1);
        g.answer(7);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        answered(&r);
        assert_eq!(seen, [1, 513, 0]);
    });
}

/// A write of `fill` at `sector` through request slot `k` (descriptors 3k..3k+2).
fn write_request(g: &mut Guest, k: u16, sector: u64, fill: u8) {
    let hdr = HDR + 0x20 * u64::from(k);
    let buf = BUF + 0x200 * u64::from(k);
    g.header(hdr, T_OUT, sector);
    g.put(buf, &[fill; 512]);
    g.put(STATUS + u64::from(k), &[0xff]);
    let d = 3 * u32::from(k);
    g.desc(DESC, d, hdr, 16, F_NEXT, (d + 1) as u16);
    g.desc(DESC, d + 1, buf, 512, F_NEXT, (d + 2) as u16);
    g.desc(DESC, d + 2, STATUS + u64::from(k), 1, F_WRITE, 0);
    g.avail(k, d as u16);
}

/// Ring WRITE_END_HIGH and WRITE_PHASE declaring `end`.
fn write_phase(g: &mut Guest, end: u64) {
    g.ring(DOORBELL_WRITE_END_HIGH, (end >> 32) as u32);
    g.ring(DOORBELL_WRITE_PHASE, end as u32);
}

#[test]
fn writes_to_a_read_only_device_are_refused() {
    in_child("writes_to_a_read_only_device_are_refused", || {
        let before = pattern(4096);
        let img = ScratchFile::new("ro", &before);
        let mut g = Guest::default();
        write_request(&mut g, 0, 0, 0xee);
        g.avail_idx(1);
        g.setup_queue();
        write_phase(&mut g, 4096);
        g.notify();
        g.report(STATUS, 1);
        g.answer(7);
        // Even a writable descriptor from the caller is reopened read-only.
        let file = img.open(true);
        let devices = [Device {
            file: &file,
            writable: false,
        }];
        let mut seen = Vec::new();
        let r = run(
            &g.elf(),
            &selftest_call(SelfTest::Echo(0)),
            &devices,
            &Config::default(),
            &mut |v| seen.push(v),
        );
        answered(&r);
        assert_eq!(seen, [u32::from(S_IOERR)]);
        assert_eq!(img.contents(), before);
    });
}

fn safe_rebase_call() -> Call {
    Call {
        device_sizes: vec![],
        request: Request::Rebase(RebaseRequest {
            overlay_format: instar_abi::Format::Qcow2,
            unsafe_mode: false,
            new_backing: None,
            old_chain: vec![],
            new_chain: vec![],
            in_chain: None,
            data_file_checked: true,
            progress: false,
            compress: false,
            keys: Vec::new(),
            zstd: Default::default(),
        }),
    }
}

#[test]
fn writes_before_the_write_phase_or_past_its_end_are_refused() {
    in_child(
        "writes_before_the_write_phase_or_past_its_end_are_refused",
        || {
            let before = pattern(4096);
            let img = ScratchFile::new("phase", &before);
            let mut g = Guest::default();
            // 0: before the write phase. 1: inside the declared end (1000 bytes: two
            // sectors). 2: past it.
            write_request(&mut g, 0, 0, 0xa0);
            write_request(&mut g, 1, 1, 0xa1);
            write_request(&mut g, 2, 2, 0xa2);
            g.avail_idx(1);
            g.setup_queue();
            g.notify();
            write_phase(&mut g, 1000);
            // avail->idx = 3 (and slot 0 keeps head 0).
            g.store32(AVAIL + 2, 3);
            g.notify();
            for k in 0..3 {
                g.report(STATUS + k, 1);
            }
            g.answer(7);
            let config = Config {
                virtual_size: Some(4096),
                ..Config::default()
            };
            let (r, seen) = go(g, &safe_rebase_call(), &img.open(true), true, &config);
            answered(&r);
            assert_eq!(
                seen,
                [u32::from(S_IOERR), u32::from(S_OK), u32::from(S_IOERR)]
            );
            let mut want = before.clone();
            want[512..1024].fill(0xa1);
            assert_eq!(img.contents(), want);
        },
    );
}

#[test]
fn a_declared_end_past_the_host_bound_is_cut_to_it() {
    in_child("a_declared_end_past_the_host_bound_is_cut_to_it", || {
        let before = pattern(4096);
        let img = ScratchFile::new("cap", &before);
        let mut g = Guest::default();
        // Declared end u64::MAX; the host's bound for a 4 KiB image of 4 KiB virtual
        // size is about 64 MiB: a write at 1 MiB is fine, one at 512 GiB is not.
        write_request(&mut g, 0, 1 << 11, 0xb0);
        write_request(&mut g, 1, 1 << 30, 0xb1);
        g.avail_idx(2);
        g.setup_queue();
        write_phase(&mut g, u64::MAX);
        g.notify();
        g.report(STATUS, 1);
        g.report(STATUS + 1, 1);
        g.answer(7);
        let config = Config {
            virtual_size: Some(4096),
            ..Config::default()
        };
        let (r, seen) = go(g, &safe_rebase_call(), &img.open(true), true, &config);
        answered(&r);
        assert_eq!(seen, [u32::from(S_OK), u32::from(S_IOERR)]);
        let after = img.contents();
        assert_eq!(after.len(), (1 << 20) + 512);
        assert_eq!(&after[..4096], &before[..]);
    });
}

#[test]
fn write_phase_twice_ends_the_vm() {
    in_child("write_phase_twice_ends_the_vm", || {
        let img = ScratchFile::new("twice", &pattern(512));
        let mut g = Guest::default();
        write_phase(&mut g, 512);
        write_phase(&mut g, 1 << 40);
        g.answer(7);
        let (r, _) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(true),
            true,
            &Config::default(),
        );
        let err = r.unwrap_err().to_string();
        assert!(err.contains("write phase twice"), "{err}");
    });
}

/// Run a guest that floods the host with exits forever under a 1 s deadline (and a
/// 30 s watchdog, which an exit flood never trips).
fn flood(body: impl FnOnce(&mut Guest)) {
    let img = ScratchFile::new("flood", &pattern(4096));
    let mut g = Guest::default();
    g.forever(body);
    let deadline = Duration::from_secs(1);
    let config = Config {
        deadline: Some(deadline),
        ..Config::default()
    };
    let start = Instant::now();
    let (r, _) = go(
        g,
        &selftest_call(SelfTest::Echo(0)),
        &img.open(false),
        false,
        &config,
    );
    let took = start.elapsed();
    assert!(
        matches!(r, Err(Error::Deadline(d)) if d == deadline),
        "{r:?}"
    );
    assert_eq!(
        r.unwrap_err().to_string(),
        "internal error in sandbox: the guest did not finish within its deadline of 1 s"
    );
    assert!(took >= deadline && took < deadline * 10, "{took:?}");
}

#[test]
fn doorbell_floods_end_at_the_deadline() {
    in_child("doorbell_floods_end_at_the_deadline", || {
        flood(|g| g.ring(DOORBELL_PROGRESS, 1));
    });
}

#[test]
fn register_read_floods_end_at_the_deadline() {
    in_child("register_read_floods_end_at_the_deadline", || {
        flood(|g| g.report(VIRTIO_MMIO_BASE + REG_MAGIC, 4));
    });
}

#[test]
fn request_floods_end_at_the_deadline() {
    in_child("request_floods_end_at_the_deadline", || {
        // The same 256 requests again and again: the avail index moves on by 256
        // every round, the used index follows.
        let mut g = Guest::default();
        status_preset(&mut g);
        g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        g.desc(DESC, 1, BUF, 512, F_NEXT | F_WRITE, 2);
        g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
        for k in 0..QUEUE_SIZE {
            g.avail(k, 0);
        }
        g.setup_queue();
        let img = ScratchFile::new("reqflood", &pattern(4096));
        // Each round makes the next 256 available (used index + 256) and notifies.
        g.forever(|c| {
            // mov rbx, USED+2; movzx eax, word [rbx]; add eax, 256;
            // mov rbx, AVAIL+2; mov [rbx], ax; notify
            c.raw(&[0x48, 0xbb]);
            c.raw(&(USED + 2).to_le_bytes());
            c.raw(&[0x0f, 0xb7, 0x03, 0x05]);
            c.raw(&256u32.to_le_bytes());
            c.raw(&[0x48, 0xbb]);
            c.raw(&(AVAIL + 2).to_le_bytes());
            c.raw(&[0x66, 0x89, 0x03]);
            c.notify();
        });
        let deadline = Duration::from_secs(1);
        let config = Config {
            deadline: Some(deadline),
            ..Config::default()
        };
        let (r, _) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &config,
        );
        assert!(matches!(r, Err(Error::Deadline(_))), "{r:?}");
    });
}

#[test]
fn a_panic_on_the_vcpu_thread_is_an_error() {
    in_child("a_panic_on_the_vcpu_thread_is_an_error", || {
        let img = ScratchFile::new("vcpu-panic", &pattern(4096));
        let mut g = Guest::default();
        g.ring(DOORBELL_PROGRESS, 1);
        g.answer(7);
        test_hooks::arm(Site::Vcpu);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        assert!(seen.is_empty());
        assert_eq!(
            r.unwrap_err().to_string(),
            "internal error in sandbox: the vCPU thread panicked: test hook: provoked panic \
             at Vcpu \\x1b[31m"
        );
        // The process goes on: another VM runs.
        let mut g = Guest::default();
        g.answer(7);
        let (r, _) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        answered(&r);
    });
}

#[test]
fn a_panic_on_an_io_worker_fails_the_request() {
    in_child("a_panic_on_an_io_worker_fails_the_request", || {
        // A 1 MiB read of a 2 MiB file with a call that gets a worker.
        let img = ScratchFile::new("worker-panic", &pattern(2 << 20));
        let request = |g: &mut Guest| {
            status_preset(g);
            g.desc(DESC, 0, HDR, 16, F_NEXT, 1);
            g.desc(DESC, 1, IND, 1 << 20, F_NEXT | F_WRITE, 2);
            g.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
            g.avail(0, 0);
            g.avail_idx(1);
            g.setup_queue();
            g.notify();
            g.report_used(1);
            g.report(STATUS, 1);
            g.answer(7);
        };
        let call = selftest_call(SelfTest::Read {
            dev: 0,
            offset: 0,
            len: 2 << 20,
        });
        test_hooks::arm(Site::IoWorker);
        let mut g = Guest::default();
        request(&mut g);
        let (r, seen) = go(g, &call, &img.open(false), false, &Config::default());
        answered(&r);
        // Either the worker took a share and died (the request fails), or the vCPU
        // thread did every chunk before the worker woke up (it succeeds); both answer.
        assert!(
            seen == [1, 1, u32::from(S_IOERR)] || seen == [1, (1 << 20) + 1, 0],
            "{seen:?}"
        );
        let mut g = Guest::default();
        request(&mut g);
        let (r, _) = go(g, &call, &img.open(false), false, &Config::default());
        answered(&r);
    });
}

#[test]
fn a_panic_on_the_teardown_thread_is_survived() {
    in_child("a_panic_on_the_teardown_thread_is_survived", || {
        let img = ScratchFile::new("teardown-panic", &pattern(4096));
        test_hooks::arm(Site::Teardown);
        for _ in 0..3 {
            let mut g = Guest::default();
            g.answer(7);
            let (r, _) = go(
                g,
                &selftest_call(SelfTest::Echo(0)),
                &img.open(false),
                false,
                &Config::default(),
            );
            answered(&r);
        }
    });
}

#[test]
fn maximal_progress_reaches_the_callback_as_is() {
    in_child("maximal_progress_reaches_the_callback_as_is", || {
        // The host passes the count on; bounding it is the caller's business (the
        // CLI's progress counter), tested with it.
        let img = ScratchFile::new("progress", &pattern(4096));
        let mut g = Guest::default();
        for _ in 0..3 {
            g.ring(DOORBELL_PROGRESS, u32::MAX);
        }
        g.answer(7);
        let (r, seen) = go(
            g,
            &selftest_call(SelfTest::Echo(0)),
            &img.open(false),
            false,
            &Config::default(),
        );
        answered(&r);
        assert_eq!(seen, [u32::MAX; 3]);
    });
}
