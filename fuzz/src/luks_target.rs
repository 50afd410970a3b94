//! The `luks_unlock` target: a LUKS header and its key material (the region a qcow2
//! crypto header extension names), parsed with QEMU's checks and, when its work
//! factors are small, unlocked with the passphrase the seed was made with ("fuzz").
//! Invariants: no panic; the work bounds hold for every header the parse accepts; an
//! unlock makes one tick per derivation at most; an unlocked key encrypts and
//! decrypts back.

use alloc::format;
use alloc::string::{String, ToString};

use instar_luks::bounds::MAX_ITERATIONS;
use instar_luks::{unlock, LuksError, LuksHeader, HEADER_LEN};

use crate::targets::signature;

/// The passphrase of the committed seed (`fuzz/seeds/luks-header`).
pub const PASSPHRASE: &[u8] = b"fuzz";
/// Iterations the target still derives, per derivation (the seed has 1741 and 1000):
/// larger headers are only parsed, so that executions stay fast.
const FUZZ_MAX_ITERATIONS: u32 = 4096;

pub fn luks_unlock(data: &[u8]) -> Result<u64, String> {
    let Some(raw) = data.first_chunk::<HEADER_LEN>() else {
        return Ok(signature(0, "short"));
    };
    let (header, spec) = match LuksHeader::parse(raw) {
        Ok(p) => p,
        Err(e) => return Ok(signature(1, &e.to_string())),
    };
    let enabled: usize = header.slots.iter().filter(|s| s.enabled()).count();
    let most = header
        .slots
        .iter()
        .filter(|s| s.enabled())
        .map(|s| s.iterations)
        .chain([header.mk_iterations])
        .max()
        .unwrap_or(0);
    if most > MAX_ITERATIONS {
        return Err(format!("a header with {most} iterations passed the bounds"));
    }
    if most > FUZZ_MAX_ITERATIONS {
        return Ok(signature(2, "parsed"));
    }
    let read = |at: u64, buf: &mut [u8]| -> Result<(), LuksError> {
        let start = usize::try_from(at).map_err(|_| LuksError::OutsideExtension)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
            .ok_or(LuksError::OutsideExtension)?;
        buf.copy_from_slice(src);
        Ok(())
    };
    let mut ticks = 0usize;
    let result = unlock(&header, &spec, PASSPHRASE, read, || ticks += 1);
    if ticks > 2 * enabled {
        return Err(format!("{ticks} derivations for {enabled} slots"));
    }
    match result {
        Ok(key) => {
            let plain = [0x5au8; 1024];
            let mut buf = plain;
            key.cipher().encrypt(7, &mut buf);
            if buf == plain {
                return Err(String::from("encryption left the data as it was"));
            }
            key.cipher().decrypt(7, &mut buf);
            if buf != plain {
                return Err(String::from("decryption does not invert encryption"));
            }
            Ok(signature(3, "unlocked"))
        }
        Err(e) => Ok(signature(4, &e.to_string())),
    }
}
