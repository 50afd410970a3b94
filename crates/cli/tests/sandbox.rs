//! The KVM sandbox end to end: the embedded guest, virtio-blk, doorbells, watchdog,
//! seccomp. Without /dev/kvm these tests print a note and pass, unless
//! INSTAR_REQUIRE_KVM=1, where they fail.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use instar::sandbox::{run, run_detailed, Device, Options, SandboxError};
use instar_abi::{Call, ErrorKind, GuestError, Request, Response, SelfTest};
use instar_testkit::{require_kvm, ScratchFile};

/// Deterministic, non-repeating test data.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn call(test: SelfTest) -> Call {
    Call {
        device_sizes: vec![],
        request: Request::SelfTest(test),
    }
}

fn selftest(
    test: SelfTest,
    devices: &[Device<'_>],
    opts: &Options,
) -> Result<Response, SandboxError> {
    run(&call(test), devices, opts, &mut |_| {})
}

#[test]
fn echo_round_trip() {
    if !require_kvm() {
        return;
    }
    let r = selftest(
        SelfTest::Echo(0x1234_5678_9abc_def0),
        &[],
        &Options::default(),
    );
    assert_eq!(r.unwrap(), Response::SelfTest(0x1234_5678_9abc_def0));
}

#[test]
fn each_zstd_release_reports_its_own_version() {
    // The two zstd libraries are linked side by side under per-version symbol prefixes
    // (guest/build.rs): a selection that reached the wrong one would compress with the
    // wrong release's output.
    if !require_kvm() {
        return;
    }
    for v in instar_abi::ZstdVersion::ALL {
        let r = selftest(SelfTest::ZstdVersion(v), &[], &Options::default()).unwrap();
        let Response::SelfTest(packed) = r else {
            panic!("{v:?}: {r:?}");
        };
        assert_eq!(instar_abi::zstd::unpack_version(packed), v.name(), "{v:?}");
    }
    let r = selftest(SelfTest::ZlibVersion, &[], &Options::default()).unwrap();
    let Response::SelfTest(packed) = r else {
        panic!("zlib: {r:?}");
    };
    assert_eq!(instar_abi::zstd::unpack_version(packed), "1.2.13");
}

#[test]
fn read_checksums_match_the_host() {
    if !require_kvm() {
        return;
    }
    // Not a multiple of 512, so the last sector is partial.
    let bytes = data(3 * 1024 * 1024 + 777, 42);
    let img = ScratchFile::new("read", &bytes);
    let file = img.read_only();
    let devs = [Device {
        file: &file,
        writable: false,
    }];
    let len = bytes.len() as u64;
    let cases: [(u64, u32); 5] = [
        (0, bytes.len() as u32), // all of it
        (4097, 100_000),         // unaligned start and end
        (511, 2),                // across one sector boundary
        (len - 300, 300),        // the partial last sector
        (len - 1000, 5000),      // across the end: the rest reads as zeros
    ];
    for (offset, n) in cases {
        let mut expect = bytes[offset as usize..].to_vec();
        expect.resize(n as usize, 0);
        let mut seen = Vec::new();
        let r = run(
            &call(SelfTest::Read {
                dev: 0,
                offset,
                len: n,
            }),
            &devs,
            &Options::default(),
            &mut |p| seen.push(p),
        );
        assert_eq!(
            r.unwrap(),
            Response::SelfTest(fnv1a(&expect)),
            "read of {n} bytes at {offset}"
        );
        assert_eq!(seen.last(), Some(&10_000), "progress reaches 100%");
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "progress never goes back"
        );
    }
}

#[test]
fn guest_panic_is_reported_sanitised() {
    if !require_kvm() {
        return;
    }
    let msg = "boom \x1b[2J\nsecond line \u{7f}é";
    let err = selftest(SelfTest::Panic(msg.into()), &[], &Options::default()).unwrap_err();
    assert!(matches!(err, SandboxError::GuestPanic(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "internal error in sandbox: boom \\x1b[2J\\x0asecond line \\x7f\\xc3\\xa9"
        ),
        "{text}"
    );
    assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)), "{text:?}");
    // The panic location is included.
    assert!(text.contains("selftest.rs"), "{text}");
}

#[test]
fn watchdog_stops_a_spinning_guest() {
    if !require_kvm() {
        return;
    }
    let opts = Options {
        watchdog: Duration::from_millis(300),
        ..Options::default()
    };
    let start = Instant::now();
    let err = selftest(SelfTest::Spin, &[], &opts).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, SandboxError::Watchdog(_)), "{err:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(err.to_string().starts_with("internal error in sandbox: "));
}

#[test]
fn write_to_a_read_only_device_is_refused() {
    if !require_kvm() {
        return;
    }
    let bytes = data(8192, 7);
    let img = ScratchFile::new("ro", &bytes);
    // Both a read-only handle and a writable handle passed as read-only.
    for file in [img.read_only(), img.read_write()] {
        let devs = [Device {
            file: &file,
            writable: false,
        }];
        let r = selftest(SelfTest::Write { dev: 0 }, &devs, &Options::default()).unwrap();
        assert_eq!(
            r,
            Response::Error(GuestError {
                kind: ErrorKind::Plain,
                message: "device is read-only".into()
            })
        );
        assert_eq!(img.contents(), bytes, "the file is unchanged");
    }
}

#[test]
fn write_to_a_writable_device_lands() {
    if !require_kvm() {
        return;
    }
    let bytes = data(4096 + 100, 9);
    let img = ScratchFile::new("rw", &bytes);
    let file = img.read_write();
    let devs = [Device {
        file: &file,
        writable: true,
    }];
    let r = selftest(SelfTest::Write { dev: 0 }, &devs, &Options::default()).unwrap();
    assert_eq!(r, Response::SelfTest(0));
    let after = img.contents();
    let pattern: Vec<u8> = b"INSTAR-SELFTEST\n".repeat(32);
    assert_eq!(&after[..512], &pattern[..]);
    assert_eq!(&after[512..], &bytes[512..]);
}

#[test]
fn a_writable_device_needs_a_writable_file() {
    if !require_kvm() {
        return;
    }
    let img = ScratchFile::new("mode", &[0; 512]);
    let file = img.read_only();
    let devs = [Device {
        file: &file,
        writable: true,
    }];
    let err = selftest(SelfTest::Echo(1), &devs, &Options::default()).unwrap_err();
    assert!(matches!(err, SandboxError::Config(_)), "{err:?}");
}

const CHILD_ENV: &str = "INSTAR_SANDBOX_SECCOMP_CHILD";

/// Run in a child process by `seccomp_confines_the_vcpu_thread`: the progress callback,
/// which runs on the vCPU thread, tries to open a file. The filter must kill the process.
#[test]
fn seccomp_child_opens_a_file_from_the_callback() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let img = ScratchFile::new("seccomp", &data(1 << 20, 3));
    let file = img.read_only();
    let devs = [Device {
        file: &file,
        writable: false,
    }];
    let _ = run(
        &call(SelfTest::Read {
            dev: 0,
            offset: 0,
            len: 1 << 20,
        }),
        &devs,
        &Options::default(),
        &mut |_| {
            let opened = File::open("/proc/self/status").is_ok();
            println!("callback survived, opened: {opened}");
        },
    );
    // Also show that the calling thread is unconfined after the run.
    let mut s = String::new();
    File::open("/proc/self/status")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    println!(
        "caller after the run: {}",
        s.lines().find(|l| l.starts_with("Seccomp:")).unwrap_or("")
    );
    std::io::stdout().flush().unwrap();
}

#[test]
fn seccomp_confines_the_vcpu_thread() {
    if !require_kvm() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child_opens_a_file_from_the_callback",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc_sigsys()),
        "the child should die of SIGSYS; status {:?}, stdout:\n{stdout}",
        out.status
    );
    assert!(!stdout.contains("callback survived"), "{stdout}");
}

#[test]
fn the_caller_thread_stays_unconfined() {
    if !require_kvm() {
        return;
    }
    let mut progress_calls = 0;
    let img = ScratchFile::new("unconfined", &data(4096, 5));
    let file = img.read_only();
    let devs = [Device {
        file: &file,
        writable: false,
    }];
    let out = run_detailed(
        &call(SelfTest::Read {
            dev: 0,
            offset: 0,
            len: 4096,
        }),
        &devs,
        &Options::default(),
        &mut |_| progress_calls += 1,
    )
    .unwrap();
    assert!(!out.write_phase);
    assert!(progress_calls > 0);
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t0"), "{status}");
}

fn libc_sigsys() -> i32 {
    31
}
