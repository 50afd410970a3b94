//! QEMU's `qcrypto_block_luks_find_key`: try the passphrase on every active slot in
//! order; a slot unlocks when the merged key's PBKDF2 digest matches the header's.

use alloc::vec;
use zeroize::Zeroizing;

use crate::{afsplit, CipherSpec, LuksError, LuksHeader, SectorCipher, SECTOR_SIZE};

/// An unlocked master key, held only as its expanded cipher (the AES round keys are
/// wiped on drop), and the spec it is used with.
pub struct MasterKey {
    pub spec: CipherSpec,
    cipher: SectorCipher,
}

impl core::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MasterKey")
            .field("spec", &self.spec)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl MasterKey {
    /// The payload cipher.
    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }

    pub fn into_cipher(self) -> SectorCipher {
        self.cipher
    }
}

/// Unlock with `password`, reading key material through `read(offset, buf)` (offsets
/// from the start of the LUKS header). `tick` runs before every PBKDF2 derivation: in
/// the sandbox it makes a VM exit, so that the watchdog sees each bounded derivation
/// ([`crate::bounds`]) as its own stretch of work.
pub fn unlock(
    header: &LuksHeader,
    spec: &CipherSpec,
    password: &[u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), LuksError>,
    mut tick: impl FnMut(),
) -> Result<MasterKey, LuksError> {
    let key_len = spec.key_len();
    let mut material = Zeroizing::new(vec![0u8; header.material_len()]);
    let mut candidate = Zeroizing::new(vec![0u8; key_len]);
    for slot in header.slots.iter().filter(|s| s.enabled()) {
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        tick();
        spec.hash
            .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        read(
            u64::from(slot.key_offset) * SECTOR_SIZE as u64,
            &mut material,
        )?;
        let cipher = SectorCipher::new(spec, &slot_key).ok_or(LuksError::InvalidPassword)?;
        cipher.decrypt(0, &mut material);
        afsplit::merge(spec.hash, &material, slot.stripes as usize, &mut candidate);
        let mut digest = Zeroizing::new([0u8; 20]);
        tick();
        spec.hash.pbkdf2(
            &candidate,
            &header.mk_salt,
            header.mk_iterations,
            &mut *digest,
        );
        if *digest == header.mk_digest {
            let cipher = SectorCipher::new(spec, &candidate).ok_or(LuksError::InvalidPassword)?;
            return Ok(MasterKey {
                spec: *spec,
                cipher,
            });
        }
    }
    Err(LuksError::InvalidPassword)
}
