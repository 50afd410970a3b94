//! Encrypted data clusters. QEMU encrypts each 512-byte sector of a data cluster with
//! the IV of its sector number: the HOST offset's for LUKS (`crypt_physical_offset`),
//! the guest offset's for the legacy AES method. Requests on an encrypted image are
//! sector-aligned (QEMU sets the request alignment to the crypto sector size).

use alloc::rc::Rc;

use instar_luks::SectorCipher;

pub const CRYPT_SECTOR: u64 = 512;

/// The payload cipher of an opened encrypted image.
#[derive(Debug, Clone)]
pub struct DataCrypt {
    cipher: Rc<SectorCipher>,
    /// IVs from the host offset (LUKS) rather than the guest offset (legacy AES).
    physical: bool,
}

impl DataCrypt {
    pub fn new(cipher: Rc<SectorCipher>, physical: bool) -> DataCrypt {
        DataCrypt { cipher, physical }
    }

    fn sector(&self, host: u64, guest: u64) -> u64 {
        (if self.physical { host } else { guest }) / CRYPT_SECTOR
    }

    /// Decrypt `buf`, stored at `host` for guest offset `guest` (sector-aligned).
    pub fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.decrypt(self.sector(host, guest), buf);
    }

    /// Encrypt `buf`, to be stored at `host` for guest offset `guest` (sector-aligned).
    pub fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.encrypt(self.sector(host, guest), buf);
    }
}
