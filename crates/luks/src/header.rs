//! The LUKS1 header (592 bytes, big-endian) and QEMU's checks on it
//! (`qcrypto_block_luks_check_header`), in QEMU's order.

use alloc::string::String;
use instar_blockdev::bytes::c_str;

use crate::bounds::MAX_ITERATIONS;
use crate::{CipherSpec, LuksError};

pub const HEADER_LEN: usize = 592;
pub const SECTOR_SIZE: usize = 512;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOTS: usize = 8;
const STRIPES: u32 = 4000;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Key material starts no earlier than 4096 bytes: 8 sectors.
const HEADER_SECTORS: u64 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: u32,
    pub iterations: u32,
    pub salt: [u8; 32],
    /// In sectors from the start of the LUKS header.
    pub key_offset: u32,
    pub stripes: u32,
}

impl KeySlot {
    pub fn enabled(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// In sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; 20],
    pub mk_salt: [u8; 32],
    pub mk_iterations: u32,
    pub slots: [KeySlot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// A NUL-terminated field of 32 bytes, or QEMU's error naming it.
fn name(field: &[u8], what: &'static str) -> Result<String, LuksError> {
    if !field.contains(&0) {
        return Err(LuksError::NotTerminated(what));
    }
    Ok(String::from_utf8_lossy(c_str(field)).into_owned())
}

impl LuksHeader {
    /// Parse and check a header, then look its algorithms up, as QEMU's open does
    /// before it touches a key; then instar's work bounds.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<(LuksHeader, CipherSpec), LuksError> {
        if &b[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::Version(version));
        }
        let h = LuksHeader {
            cipher_name: name(&b[8..40], "cipher name")?,
            cipher_mode: name(&b[40..72], "cipher mode")?,
            hash_spec: name(&b[72..104], "hash spec")?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: arr(b, 112),
            mk_salt: arr(b, 132),
            mk_iterations: be32(b, 164),
            slots: core::array::from_fn(|i| {
                let at = 208 + 48 * i;
                KeySlot {
                    active: be32(b, at),
                    iterations: be32(b, at + 4),
                    salt: arr(b, at + 8),
                    key_offset: be32(b, at + 40),
                    stripes: be32(b, at + 44),
                }
            }),
        };
        h.check()?;
        let spec = CipherSpec::parse(&h.cipher_name, &h.cipher_mode, &h.hash_spec, h.key_bytes)?;
        h.check_bounds()?;
        if !h.material_len().is_multiple_of(SECTOR_SIZE) {
            return Err(LuksError::MaterialNotSectors(h.material_len()));
        }
        Ok((h, spec))
    }

    /// Sectors a slot's key material takes, rounded as cryptsetup (and QEMU) do.
    fn material_sectors(&self, stripes: u32) -> u64 {
        let bytes = u64::from(self.key_bytes) * u64::from(stripes);
        bytes.div_ceil(SECTOR_SIZE as u64).div_ceil(HEADER_SECTORS) * HEADER_SECTORS
    }

    fn check(&self) -> Result<(), LuksError> {
        if u64::from(self.payload_offset) < HEADER_SECTORS {
            return Err(LuksError::PayloadOverlapsHeader);
        }
        if self.mk_iterations == 0 {
            return Err(LuksError::MasterIterationsZero);
        }
        for (i, s) in self.slots.iter().enumerate() {
            self.check_slot(i, s)?;
            let (start1, len1) = (u64::from(s.key_offset), self.material_sectors(s.stripes));
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let (start2, len2) = (u64::from(t.key_offset), self.material_sectors(t.stripes));
                // QEMU's ranges_overlap: inclusive last sectors.
                let last1 = (start1 + len1).wrapping_sub(1);
                let last2 = (start2 + len2).wrapping_sub(1);
                if !(last2 < start1 || last1 < start2) {
                    return Err(LuksError::SlotsOverlap(i, j));
                }
            }
        }
        Ok(())
    }

    fn check_slot(&self, i: usize, s: &KeySlot) -> Result<(), LuksError> {
        if s.stripes != STRIPES {
            return Err(LuksError::Stripes {
                slot: i,
                stripes: s.stripes as i32,
            });
        }
        if s.active != SLOT_DISABLED && s.active != SLOT_ENABLED {
            return Err(LuksError::SlotState(i));
        }
        if s.enabled() && s.iterations == 0 {
            return Err(LuksError::SlotIterationsZero(i));
        }
        if u64::from(s.key_offset) < HEADER_SECTORS {
            return Err(LuksError::SlotOverlapsHeader(i));
        }
        if u64::from(s.key_offset) + self.material_sectors(s.stripes)
            > u64::from(self.payload_offset)
        {
            return Err(LuksError::SlotOverlapsPayload(i));
        }
        Ok(())
    }

    /// instar's bounds ([`crate::bounds`]): no derivation past them is started.
    fn check_bounds(&self) -> Result<(), LuksError> {
        let limit = u64::from(MAX_ITERATIONS);
        let mut worst = self.mk_iterations;
        let mut what = "master key iterations";
        for s in self.slots.iter().filter(|s| s.enabled()) {
            if s.iterations > worst {
                worst = s.iterations;
                what = "key slot iterations";
            }
        }
        if u64::from(worst) > limit {
            return Err(LuksError::TooMuchWork {
                what,
                value: u64::from(worst),
                limit,
            });
        }
        Ok(())
    }

    /// Bytes of one slot's key material.
    pub fn material_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// A well-formed header: AES-256-XTS-plain64, SHA-256, slot 0 active.
    fn header() -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4096u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        for i in 0..SLOTS {
            let at = 208 + 48 * i;
            let active = if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED };
            b[at..at + 4].copy_from_slice(&active.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&2000u32.to_be_bytes());
            b[at + 40..at + 44].copy_from_slice(&(8 + 504 * i as u32).to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        b
    }

    fn err(f: impl FnOnce(&mut [u8; HEADER_LEN])) -> String {
        let mut b = header();
        f(&mut b);
        LuksHeader::parse(&b).unwrap_err().to_string()
    }

    #[test]
    fn well_formed_header_parses() {
        let (h, spec) = LuksHeader::parse(&header()).unwrap();
        assert_eq!(spec.key_len(), 64);
        assert_eq!(h.material_len(), 256_000);
        assert!(h.slots[0].enabled() && !h.slots[1].enabled());
    }

    #[test]
    fn qemu_checks_and_messages() {
        assert_eq!(err(|b| b[0] = b'X'), "Volume is not in LUKS format");
        assert_eq!(err(|b| b[7] = 2), "LUKS version 2 is not supported");
        assert_eq!(
            err(|b| b[40..72].fill(b'x')),
            "LUKS header cipher mode is not NUL terminated"
        );
        assert_eq!(
            err(|b| b[104..108].copy_from_slice(&7u32.to_be_bytes())),
            "LUKS payload is overlapping with the header"
        );
        assert_eq!(
            err(|b| b[208 + 48 + 44..208 + 96].copy_from_slice(&1u32.to_be_bytes())),
            "Keyslot 1 is corrupted (stripes 1 != 4000)"
        );
        assert_eq!(
            err(|b| b[208 + 40..208 + 44].copy_from_slice(&512u32.to_be_bytes())),
            "Keyslots 0 and 1 are overlapping in the header"
        );
        assert_eq!(
            err(|b| b[40..51].copy_from_slice(b"xts:plain64")),
            "Unexpected cipher mode string format 'xts:plain64'"
        );
        assert_eq!(
            err(|b| b[108..112].copy_from_slice(&40u32.to_be_bytes())),
            "Algorithm 'aes' with key size 20 bytes not supported"
        );
        assert!(err(|b| b[8..15].copy_from_slice(b"serpent")).contains("not supported by instar"));
        let cbc = |b: &mut [u8; HEADER_LEN], mode: &[u8]| {
            b[40..72].fill(0);
            b[40..40 + mode.len()].copy_from_slice(mode);
            b[108..112].copy_from_slice(&32u32.to_be_bytes());
        };
        assert_eq!(
            err(|b| cbc(b, b"cbc-essiv")),
            "Missing IV generator hash specification"
        );
        assert_eq!(
            err(|b| cbc(b, b"cbc-essiv:sha1")),
            "No AES cipher with key size 20 available"
        );
        assert_eq!(
            err(|b| cbc(b, b"cbc-lmk")),
            "IV generator 'lmk' not supported"
        );
        // Key material of 24 x 4000 bytes is not whole sectors (QEMU asserts).
        assert!(err(|b| {
            cbc(b, b"cbc-plain64");
            b[108..112].copy_from_slice(&24u32.to_be_bytes());
        })
        .contains("not a whole number of 512-byte sectors"));
    }

    #[test]
    fn work_bounds_are_enforced() {
        let too_many = (MAX_ITERATIONS + 1).to_be_bytes();
        assert_eq!(
            err(|b| b[212..216].copy_from_slice(&too_many)),
            "LUKS key slot iterations 33554433 exceeds instar's limit of 33554432"
        );
        assert_eq!(
            err(|b| b[164..168].copy_from_slice(&too_many)),
            "LUKS master key iterations 33554433 exceeds instar's limit of 33554432"
        );
        // A disabled slot's iterations are never used: no bound.
        let mut b = header();
        b[208 + 48 + 4..208 + 48 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(LuksHeader::parse(&b).is_ok());
    }
}
