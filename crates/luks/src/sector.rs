//! The payload (and key material) ciphers: AES in XTS or CBC mode over 512-byte
//! sectors, each with the IV its sector number gives.

use alloc::boxed::Box;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;
use zeroize::Zeroizing;

use crate::{CipherSpec, IvGen, Mode, SECTOR_SIZE};

/// One AES of any key size.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    /// `key` is 16, 24 or 32 bytes (the spec's parse guarantees it).
    fn new(key: &[u8]) -> Option<Aes> {
        Some(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).ok()?),
            24 => Aes::A192(Aes192::new_from_slice(key).ok()?),
            32 => Aes::A256(Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// Boxed: the expanded keys are up to 2 KiB, held once per open image.
enum Engine {
    Xts128(Box<Xts128<Aes128>>),
    Xts192(Box<Xts128<Aes192>>),
    Xts256(Box<Xts128<Aes256>>),
    Cbc(Box<Aes>),
}

/// The cipher of one key (a slot key or the master key) with its IV generator.
/// Its Debug shows no key material.
pub struct SectorCipher {
    engine: Engine,
    ivgen: IvGen,
    /// ESSIV's AES, keyed with H(key).
    essiv: Option<Aes>,
}

impl core::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SectorCipher(<redacted>)")
    }
}

impl SectorCipher {
    /// QEMU's legacy qcow2 AES (crypt_method 1, `encrypt.format=aes`): AES-128-CBC
    /// with plain64 IVs, keyed with the passphrase's first 16 bytes, zero-padded; no
    /// key derivation and nothing to check a passphrase against.
    pub fn legacy_qcow_aes(password: &[u8]) -> SectorCipher {
        let mut key = Zeroizing::new([0u8; 16]);
        let n = password.len().min(16);
        key[..n].copy_from_slice(&password[..n]);
        SectorCipher {
            engine: Engine::Cbc(Box::new(Aes::A128(Aes128::new(GenericArray::from_slice(
                &key[..],
            ))))),
            ivgen: IvGen::Plain64,
            essiv: None,
        }
    }

    /// A cipher for `key` (of `spec.key_len()` bytes).
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Option<SectorCipher> {
        if key.len() != spec.key_len() {
            return None;
        }
        let engine = match spec.mode {
            Mode::Cbc => Engine::Cbc(Box::new(Aes::new(key)?)),
            Mode::Xts => {
                let (k1, k2) = key.split_at(spec.aes_key_bytes);
                match (Aes::new(k1)?, Aes::new(k2)?) {
                    (Aes::A128(a), Aes::A128(b)) => Engine::Xts128(Box::new(Xts128::new(a, b))),
                    (Aes::A192(a), Aes::A192(b)) => Engine::Xts192(Box::new(Xts128::new(a, b))),
                    (Aes::A256(a), Aes::A256(b)) => Engine::Xts256(Box::new(Xts128::new(a, b))),
                    _ => return None,
                }
            }
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv { hash, key_bytes } => {
                let salt = Zeroizing::new(hash.digest(&[key]));
                Some(Aes::new(salt.get(..key_bytes)?)?)
            }
            _ => None,
        };
        Some(SectorCipher {
            engine,
            ivgen: spec.ivgen,
            essiv,
        })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv { .. } => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            e.encrypt_block(&mut iv);
        }
        iv
    }

    /// Encrypt `buf` in place; its first byte is at sector `first_sector`. A last
    /// partial sector (key material) is one shorter unit, as in QEMU; lengths are
    /// multiples of 16.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(first_sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Xts128(x) => x.encrypt_sector(s, iv),
                Engine::Xts192(x) => x.encrypt_sector(s, iv),
                Engine::Xts256(x) => x.encrypt_sector(s, iv),
                Engine::Cbc(a) => cbc_encrypt(a, &iv, s),
            }
        }
    }

    /// Decrypt `buf` in place (units as [`SectorCipher::encrypt`]).
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(first_sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Xts128(x) => x.decrypt_sector(s, iv),
                Engine::Xts192(x) => x.decrypt_sector(s, iv),
                Engine::Xts256(x) => x.decrypt_sector(s, iv),
                Engine::Cbc(a) => cbc_decrypt(a, &iv, s),
            }
        }
    }
}

fn cbc_encrypt(aes: &Aes, iv: &[u8; 16], sector: &mut [u8]) {
    fn run<C>(c: &C, iv: &[u8; 16], sector: &mut [u8])
    where
        C: BlockEncrypt + aes::cipher::BlockCipher<BlockSize = aes::cipher::consts::U16> + Clone,
    {
        let mut e = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv.into());
        for b in sector.chunks_exact_mut(16) {
            e.encrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    }
    match aes {
        Aes::A128(c) => run(c, iv, sector),
        Aes::A192(c) => run(c, iv, sector),
        Aes::A256(c) => run(c, iv, sector),
    }
}

fn cbc_decrypt(aes: &Aes, iv: &[u8; 16], sector: &mut [u8]) {
    fn run<C>(c: &C, iv: &[u8; 16], sector: &mut [u8])
    where
        C: BlockDecrypt + aes::cipher::BlockCipher<BlockSize = aes::cipher::consts::U16> + Clone,
    {
        let mut d = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv.into());
        for b in sector.chunks_exact_mut(16) {
            d.decrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    }
    match aes {
        Aes::A128(c) => run(c, iv, sector),
        Aes::A192(c) => run(c, iv, sector),
        Aes::A256(c) => run(c, iv, sector),
    }
}
