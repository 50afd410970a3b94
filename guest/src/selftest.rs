//! [`instar_abi::SelfTest`]: requests that exercise the sandbox itself.

use alloc::string::ToString;
use alloc::vec;
use instar_abi::layout::DOORBELL_PROGRESS;
use instar_abi::{ErrorKind, GuestError, Response, SelfTest};
use instar_blockdev::BlockDev;

use crate::disk::Disk;
use crate::runtime;

/// The sector `SelfTest::Write` writes at offset 0: this 16-byte text repeated.
pub const WRITE_PATTERN: &[u8; 16] = b"INSTAR-SELFTEST\n";
/// Bytes per read request of `SelfTest::Read` (a progress doorbell follows each).
const READ_CHUNK: usize = 2 << 20;

fn error(message: alloc::string::String) -> Response {
    Response::Error(GuestError {
        kind: ErrorKind::Plain,
        message,
    })
}

/// FNV-1a, 64 bits.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

pub fn run(test: &SelfTest, disks: &mut [Disk]) -> Response {
    match test {
        SelfTest::Echo(v) => Response::SelfTest(*v),
        SelfTest::Panic(msg) => panic!("{msg}"),
        SelfTest::Spin => runtime::halt(),
        SelfTest::Write { dev } => {
            let Some(disk) = disks.get_mut(*dev as usize) else {
                return error("no such device".to_string());
            };
            let mut sector = [0u8; 512];
            for chunk in sector.chunks_mut(WRITE_PATTERN.len()) {
                chunk.copy_from_slice(WRITE_PATTERN);
            }
            runtime::write_phase(sector.len() as u64);
            match disk.write_at(0, &sector).and_then(|()| disk.flush()) {
                Ok(()) => Response::SelfTest(0),
                Err(e) => error(e.to_string()),
            }
        }
        // Bytes past the device's end read as zeros (how a short backing file reads).
        SelfTest::Read { dev, offset, len } => {
            let Some(disk) = disks.get_mut(*dev as usize) else {
                return error("no such device".to_string());
            };
            let total = *len as u64;
            let mut buf = vec![0u8; READ_CHUNK.min(*len as usize)];
            let mut hash = FNV_OFFSET;
            let mut done = 0u64;
            while done < total {
                let n = (total - done).min(buf.len() as u64) as usize;
                let Some(pos) = offset.checked_add(done) else {
                    return error("offset overflow".to_string());
                };
                if let Err(e) = disk.read_zero_padded(pos, &mut buf[..n]) {
                    return error(e.to_string());
                }
                hash = fnv1a(hash, &buf[..n]);
                done += n as u64;
                runtime::ring(DOORBELL_PROGRESS, (done * 10_000 / total) as u32);
            }
            Response::SelfTest(hash)
        }
        SelfTest::ZstdVersion(v) => {
            version(crate::compressor::GuestCompressor { zstd: *v }.zstd_version())
        }
        SelfTest::ZlibVersion => version(crate::compressor::zlib_version()),
    }
}

/// A library's version string, packed for the answer.
fn version(s: &[u8]) -> Response {
    match instar_abi::zstd::pack_version(s) {
        Some(v) => Response::SelfTest(v),
        None => error("version string longer than 8 bytes".to_string()),
    }
}
