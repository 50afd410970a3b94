//! The algorithms a header names (cipher name, `mode-ivgen[:hash]`, hash spec), looked
//! up in QEMU's order with QEMU's messages.

use alloc::string::String;

use crate::{HashAlg, LuksError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Xts,
    Cbc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The sector number, 32 bits little-endian, zero-padded.
    Plain,
    /// The sector number, 64 bits little-endian, zero-padded.
    Plain64,
    /// plain64 encrypted with AES under H(master key); `key_bytes` is that AES's key
    /// size (the digest's length, QEMU's dm-crypt quirk).
    Essiv { hash: HashAlg, key_bytes: usize },
}

/// Everything needed to run the ciphers of one LUKS volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// One AES key's size: 16, 24 or 32 (an XTS key is two of them).
    pub aes_key_bytes: usize,
    pub mode: Mode,
    pub ivgen: IvGen,
    /// The PBKDF2 and anti-forensic hash.
    pub hash: HashAlg,
}

impl CipherSpec {
    /// The master key's length.
    pub fn key_len(&self) -> usize {
        match self.mode {
            Mode::Xts => self.aes_key_bytes * 2,
            Mode::Cbc => self.aes_key_bytes,
        }
    }

    /// QEMU's `qcrypto_block_luks_parse_header` on the header's three strings.
    pub fn parse(
        cipher_name: &str,
        cipher_mode: &str,
        hash_spec: &str,
        key_bytes: u32,
    ) -> Result<CipherSpec, LuksError> {
        let (mode_name, ivgen_full) = cipher_mode
            .split_once('-')
            .ok_or_else(|| LuksError::ModeFormat(cipher_mode.into()))?;
        let (ivgen_name, ivhash) = match ivgen_full.split_once(':') {
            Some((g, h)) => (g, Some(iv_hash(h)?)),
            None => (ivgen_full, None),
        };
        let mode = mode_lookup(mode_name)?;
        let aes_key_bytes = cipher_lookup(cipher_name, mode, key_bytes)?;
        let hash = HashAlg::from_name(hash_spec)?;
        let ivgen = match ivgen_name {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => essiv(aes_key_bytes, ivhash)?,
            n => {
                return Err(LuksError::NameNotSupported {
                    kind: "IV generator",
                    name: n.into(),
                })
            }
        };
        Ok(CipherSpec {
            aes_key_bytes,
            mode,
            ivgen,
            hash,
        })
    }
}

/// An IV hash: a name QEMU does not know fails at once; one it knows but instar does
/// not implement is only an error if ESSIV uses it (plain IVs ignore the hash).
fn iv_hash(name: &str) -> Result<Result<HashAlg, LuksError>, LuksError> {
    match HashAlg::from_name(name) {
        Err(e @ LuksError::NameNotSupported { .. }) => Err(e),
        other => Ok(other),
    }
}

fn mode_lookup(name: &str) -> Result<Mode, LuksError> {
    match name {
        "xts" => Ok(Mode::Xts),
        "cbc" => Ok(Mode::Cbc),
        "ecb" | "ctr" => Err(LuksError::Unimplemented {
            what: "cipher mode",
            name: name.into(),
        }),
        n => Err(LuksError::NameNotSupported {
            kind: "Cipher mode",
            name: n.into(),
        }),
    }
}

/// The cipher name with the header's key size (halved for XTS, as QEMU does).
fn cipher_lookup(name: &str, mode: Mode, key_bytes: u32) -> Result<usize, LuksError> {
    let per_key = if mode == Mode::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    match (name, per_key) {
        ("aes", 16 | 24 | 32) => Ok(per_key as usize),
        ("cast5" | "serpent" | "twofish" | "sm4", _) => Err(LuksError::Unimplemented {
            what: "cipher",
            name: name.into(),
        }),
        _ => Err(LuksError::KeySize {
            name: String::from(name),
            key_bytes: per_key as i32,
        }),
    }
}

/// ESSIV's AES: the key size is the IV hash's digest length when AES has one that size.
fn essiv(
    aes_key_bytes: usize,
    ivhash: Option<Result<HashAlg, LuksError>>,
) -> Result<IvGen, LuksError> {
    let hash = ivhash.ok_or(LuksError::MissingIvHash)??;
    let d = hash.digest_len();
    // QEMU keeps the payload's AES when the sizes match, else picks AES by digest size:
    // either way the ESSIV key is the whole digest.
    let _ = aes_key_bytes;
    if !matches!(d, 16 | 24 | 32) {
        return Err(LuksError::EssivKeySize(d));
    }
    Ok(IvGen::Essiv { hash, key_bytes: d })
}
