//! The VMM against tiny hand-assembled guests that misbehave at CPL0: faults, stray
//! MMIO, port I/O, hostile responses, spinning. Without /dev/kvm these tests print a
//! note and pass, unless INSTAR_REQUIRE_KVM=1, where they fail.

use std::time::{Duration, Instant};

use instar_abi::{Call, Request, SelfTest};
use instar_testkit::require_kvm;
use instar_vmm::{run, Config, Error};

const LOAD: u64 = 0x10_0000;
const HEADERS: u64 = 64 + 56;
const ENTRY: u64 = LOAD + HEADERS;

/// A static ELF with one PT_LOAD segment at `vaddr` holding the headers and `code`.
fn elf_at(vaddr: u64, code: &[u8], extra_mem: u64) -> Vec<u8> {
    let size = HEADERS + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(vaddr + HEADERS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    assert_eq!(e.len(), 64);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&vaddr.to_le_bytes());
    e.extend_from_slice(&vaddr.to_le_bytes());
    e.extend_from_slice(&size.to_le_bytes());
    e.extend_from_slice(&(size + extra_mem).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}

fn elf(code: &[u8]) -> Vec<u8> {
    elf_at(LOAD, code, 0)
}

// Hand-assembled x86-64.
fn mov_rbx(v: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xbb];
    c.extend_from_slice(&v.to_le_bytes());
    c
}
fn mov_rax(v: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c
}
fn mov_eax(v: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c
}
const STORE_EAX_AT_RBX: [u8; 2] = [0x89, 0x03];
const STORE_EAX_AT_RBX_4: [u8; 3] = [0x89, 0x43, 0x04];
const STORE_RAX_AT_RBX: [u8; 3] = [0x48, 0x89, 0x03];
const SPIN: [u8; 2] = [0xeb, 0xfe];
const UD2: [u8; 2] = [0x0f, 0x0b];

fn doorbell(code: u32) -> Vec<u8> {
    [
        mov_rbx(0xc000_0000),
        mov_rax((code as u64) << 32),
        STORE_RAX_AT_RBX.to_vec(),
        SPIN.to_vec(),
    ]
    .concat()
}

fn echo() -> Call {
    Call {
        device_sizes: vec![],
        request: Request::SelfTest(SelfTest::Echo(1)),
    }
}

fn go(elf: &[u8], config: &Config) -> Result<instar_vmm::Outcome, Error> {
    run(elf, &echo(), &[], config, &mut |_| {})
}

#[test]
fn triple_fault_is_reported_with_rip() {
    if !require_kvm() {
        return;
    }
    let err = go(&elf(&UD2), &Config::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("internal error in sandbox: triple fault at RIP {ENTRY:#x}")
    );
}

#[test]
fn stack_guard_page_faults() {
    if !require_kvm() {
        return;
    }
    // A write just below the image (the top of the guard page) faults.
    let code = [mov_rbx(LOAD - 8), STORE_EAX_AT_RBX.to_vec(), SPIN.to_vec()].concat();
    let err = go(&elf(&code), &Config::default()).unwrap_err();
    assert!(err.to_string().contains("triple fault"), "{err}");
}

#[test]
fn stray_mmio_is_an_error() {
    if !require_kvm() {
        return;
    }
    let code = [
        mov_rbx(0xd000_5000),
        STORE_EAX_AT_RBX.to_vec(),
        UD2.to_vec(),
    ]
    .concat();
    let err = go(&elf(&code), &Config::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("internal error in sandbox: write to unmapped address 0xd0005000 at RIP"),
        "{text}"
    );
}

#[test]
fn port_io_is_an_error() {
    if !require_kvm() {
        return;
    }
    let err = go(&elf(&[0xe6, 0x80, 0x0f, 0x0b]), &Config::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unexpected VM exit IoOut"), "{text}");
}

#[test]
fn unknown_doorbell_is_an_error() {
    if !require_kvm() {
        return;
    }
    let err = go(&elf(&doorbell(9)), &Config::default()).unwrap_err();
    assert!(err.to_string().contains("unknown doorbell code 9"), "{err}");
}

#[test]
fn panic_text_is_sanitised_and_bad_lengths_survive() {
    if !require_kvm() {
        return;
    }
    // Length 4, text "A\x1b[\n".
    let code = [
        mov_rbx(0xc000),
        mov_eax(4),
        STORE_EAX_AT_RBX.to_vec(),
        mov_eax(u32::from_le_bytes(*b"A\x1b[\n")),
        STORE_EAX_AT_RBX_4.to_vec(),
        doorbell(2),
    ]
    .concat();
    let err = go(&elf(&code), &Config::default()).unwrap_err();
    assert!(matches!(err, Error::GuestPanic(_)));
    assert_eq!(err.to_string(), "internal error in sandbox: A\\x1b[\\x0a");

    // A length far past the area.
    let code = [
        mov_rbx(0xc000),
        mov_eax(u32::MAX),
        STORE_EAX_AT_RBX.to_vec(),
        doorbell(2),
    ]
    .concat();
    let err = go(&elf(&code), &Config::default()).unwrap_err();
    assert_eq!(err.to_string(), "internal error in sandbox: (no message)");
}

#[test]
fn malformed_response_is_an_error() {
    if !require_kvm() {
        return;
    }
    // DONE with an empty response area.
    let err = go(&elf(&doorbell(1)), &Config::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("internal error in sandbox: bad response from the guest"),
        "{err}"
    );
}

/// Run `elf` on its own thread; None if it has not finished after `timeout` (the
/// thread is then left spinning until the test process exits).
fn go_within(
    elf: Vec<u8>,
    config: Config,
    timeout: Duration,
    mut on_progress: impl FnMut(u32) + Send + 'static,
) -> Option<Result<instar_vmm::Outcome, Error>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(&elf, &echo(), &[], &config, &mut on_progress));
    });
    rx.recv_timeout(timeout).ok()
}

#[test]
fn watchdog_stops_a_spinning_guest() {
    if !require_kvm() {
        return;
    }
    let limit = Duration::from_millis(200);
    let config = Config {
        watchdog: limit,
        ..Config::default()
    };
    let start = Instant::now();
    let result = go_within(elf(&SPIN), config, Duration::from_secs(5), |_| {})
        .expect("the watchdog did not stop a spinning guest");
    let elapsed = start.elapsed();
    assert!(matches!(result, Err(Error::Watchdog(_))), "{result:?}");
    // Not before the limit, and within a tick (limit / 4) after it, plus generous slack
    // for the VM's start-up and scheduling on a loaded 2-core machine (tests run in
    // parallel); a watchdog that never fires fails through go_within's 5 s timeout.
    assert!(elapsed >= limit, "{elapsed:?}");
    assert!(
        elapsed < limit + limit / 4 + Duration::from_secs(1),
        "{elapsed:?}"
    );
}

/// PROGRESS(1) `count` times, then DONE with an empty response area.
fn ring_progress(count: u32) -> Vec<u8> {
    let mut code = [
        mov_rbx(0xc000_0000),
        mov_rax(3 << 32 | 1),
        vec![0xb9], // mov ecx, imm32
        count.to_le_bytes().to_vec(),
    ]
    .concat();
    // loop: mov [rbx], rax; dec ecx; jnz loop
    code.extend_from_slice(&STORE_RAX_AT_RBX);
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xf9]);
    code.extend_from_slice(&doorbell(1));
    code
}

#[test]
fn watchdog_spares_a_guest_that_keeps_exiting() {
    if !require_kvm() {
        return;
    }
    // Far longer than the limit in all, but never the limit without an exit.
    let limit = Duration::from_millis(40);
    let config = Config {
        watchdog: limit,
        ..Config::default()
    };
    let start = Instant::now();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = count.clone();
    let result = go_within(
        elf(&ring_progress(20_000)),
        config,
        Duration::from_secs(60),
        move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .expect("the guest did not finish");
    let elapsed = start.elapsed();
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("bad response from the guest"),
        "{err} after {elapsed:?}"
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 20_000);
    assert!(
        elapsed > 2 * limit,
        "the test needs a longer run: {elapsed:?}"
    );
}

#[test]
fn watchdog_does_not_count_host_time() {
    if !require_kvm() {
        return;
    }
    // The progress callback keeps the host busy for about twelve limits (a spin loop: the
    // callback runs under the vCPU thread's seccomp filter, which has no clock or
    // sleep calls), then the guest answers at once.
    let limit = Duration::from_millis(100);
    let rounds_per_ms = {
        let t = Instant::now();
        for _ in 0..100_000 {
            std::hint::spin_loop();
        }
        100_000.0 / t.elapsed().as_secs_f64().max(1e-6) / 1000.0
    };
    // Twelve limits, so that a calibration slowed down by other load (a loaded 2-core
    // machine can make it several times too small) still keeps the host busy for more
    // than the two limits asserted below.
    let rounds = (rounds_per_ms * 12.0 * limit.as_millis() as f64) as u64;
    let config = Config {
        watchdog: limit,
        ..Config::default()
    };
    let start = Instant::now();
    let result = go_within(
        elf(&ring_progress(1)),
        config,
        Duration::from_secs(60),
        move |_| {
            for _ in 0..rounds {
                std::hint::spin_loop();
            }
        },
    )
    .expect("the guest did not finish");
    let elapsed = start.elapsed();
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("bad response from the guest"),
        "{err} after {elapsed:?}"
    );
    assert!(
        elapsed > 2 * limit,
        "the host was not busy long enough: {elapsed:?}"
    );
}

#[test]
fn progress_doorbells_reach_the_host_unclamped() {
    if !require_kvm() {
        return;
    }
    // PROGRESS(20000) (a step count, passed through as is), WRITE_PHASE, then a DONE
    // with an empty area.
    let ring = |code: u64, arg: u64| {
        [
            mov_rbx(0xc000_0000),
            mov_rax(code << 32 | arg),
            STORE_RAX_AT_RBX.to_vec(),
        ]
        .concat()
    };
    let code = [ring(3, 20_000), ring(4, 0), doorbell(1)].concat();
    let mut seen = Vec::new();
    let err = run(&elf(&code), &echo(), &[], &Config::default(), &mut |p| {
        seen.push(p)
    });
    assert!(err.is_err());
    assert_eq!(seen, [20_000]);
}

#[test]
fn bad_images_and_sizes_are_refused() {
    if !require_kvm() {
        return;
    }
    let cfg = Config::default();
    // Below the load address.
    assert!(matches!(
        go(&elf_at(0x8000, &UD2, 0), &cfg),
        Err(Error::Config(_))
    ));
    // Past the end of RAM.
    assert!(matches!(
        go(&elf_at(LOAD, &UD2, cfg.ram_size), &cfg),
        Err(Error::Config(_))
    ));
    assert!(matches!(go(b"not an elf", &cfg), Err(Error::Config(_))));
    let odd = Config {
        ram_size: (64 << 20) + 4096,
        ..Config::default()
    };
    assert!(matches!(go(&elf(&UD2), &odd), Err(Error::Config(_))));
}

const NONROOT_CHILD: &str = "INSTAR_VMM_NONROOT_CHILD";

/// Run by `non_root_users_get_kvm_or_one_clear_line` under an unprivileged uid.
#[test]
fn nonroot_child_runs_a_guest() {
    if std::env::var_os(NONROOT_CHILD).is_none() {
        return;
    }
    let err = go(&elf(&UD2), &Config::default()).unwrap_err();
    println!("RESULT: {err}");
}

/// As uid/gid 65534: a working VM if /dev/kvm lets that user in, else one line naming
/// /dev/kvm and the fix.
#[test]
fn non_root_users_get_kvm_or_one_clear_line() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    if !require_kvm() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: not root, cannot switch to an unprivileged user; skipped");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "nonroot_child_runs_a_guest",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NONROOT_CHILD, "1")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .split("RESULT: ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or_else(|| panic!("no result in {stdout}"));
    let mode = std::fs::metadata("/dev/kvm").unwrap().mode();
    if mode & 0o006 == 0o006 {
        assert!(
            line.starts_with("internal error in sandbox: triple fault"),
            "{line}"
        );
    } else {
        assert_eq!(
            line,
            "cannot open /dev/kvm: Permission denied (add your user to the 'kvm' group)"
        );
    }
}
