//! Time the sandbox with the guest's self-tests.
//!
//! ```text
//! cargo run --release -p instar-vmm --example selftest -- GUEST_ELF echo
//! cargo run --release -p instar-vmm --example selftest -- GUEST_ELF read FILE [CHUNK_MIB]
//! ```
//! `echo` prints the time from process start to the guest's answer. `read` checksums
//! FILE in the guest (SelfTest::Read per chunk, default the whole file in one call,
//! which the guest reads in 2 MiB requests) and with host `pread` in the same chunk
//! size, and prints both throughputs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use instar_abi::{Call, Request, Response, SelfTest};
use instar_vmm::{run, Config, Device};

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn process_age_secs() -> f64 {
    // Field 22 of /proc/self/stat: start time in clock ticks since boot.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let start: f64 = after
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    uptime - start / hz
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let elf = std::fs::read(&args[1]).expect("guest ELF");
    let config = Config::default();
    match args[2].as_str() {
        "echo" => {
            let t = Instant::now();
            let call = Call {
                device_sizes: vec![],
                request: Request::SelfTest(SelfTest::Echo(42)),
            };
            let out = run(&elf, &call, &[], &config, &mut |_| {}).expect("echo");
            assert_eq!(out.response, Response::SelfTest(42));
            println!(
                "echo: run() {:.2} ms; process start to answer ~{:.0} ms (10 ms clock ticks)",
                t.elapsed().as_secs_f64() * 1e3,
                process_age_secs() * 1e3
            );
        }
        "read" => {
            let file = File::open(&args[3]).expect("file");
            let len = file.metadata().expect("metadata").len();
            let chunk = args
                .get(4)
                .map(|m| m.parse::<u64>().expect("chunk MiB") << 20)
                .unwrap_or(len);
            let devs = [Device {
                file: &file,
                writable: false,
            }];
            let t = Instant::now();
            let mut guest = Vec::new();
            let mut off = 0;
            while off < len {
                let n = chunk.min(len - off) as u32;
                let call = Call {
                    device_sizes: vec![],
                    request: Request::SelfTest(SelfTest::Read {
                        dev: 0,
                        offset: off,
                        len: n,
                    }),
                };
                match run(&elf, &call, &devs, &config, &mut |_| {})
                    .expect("read")
                    .response
                {
                    Response::SelfTest(h) => guest.push(h),
                    other => panic!("{other:?}"),
                }
                off += n as u64;
            }
            let guest_s = t.elapsed().as_secs_f64();

            let t = Instant::now();
            let mut host = Vec::new();
            let mut buf = vec![0u8; 2 << 20];
            let mut off = 0;
            while off < len {
                let end = (off + chunk).min(len);
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                let mut pos = off;
                while pos < end {
                    let n = (end - pos).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], pos).expect("pread");
                    h = fnv1a(h, &buf[..n]);
                    pos += n as u64;
                }
                host.push(h);
                off = end;
            }
            let host_s = t.elapsed().as_secs_f64();
            assert_eq!(guest, host, "checksums differ");
            let t = Instant::now();
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos).expect("pread");
                pos += n as u64;
            }
            let pread_s = t.elapsed().as_secs_f64();
            let mb = len as f64 / 1e6;
            println!(
                "read {mb:.0} MB: guest {:.0} MB/s ({:.3} s), host pread+FNV {:.0} MB/s ({:.3} s), \
                 host pread alone {:.0} MB/s",
                mb / guest_s,
                guest_s,
                mb / host_s,
                host_s,
                mb / pread_s
            );
        }
        other => panic!("unknown mode {other}"),
    }
}
