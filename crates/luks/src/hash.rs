//! The hashes a LUKS header may name that instar implements: PBKDF2-HMAC over them,
//! and plain digests (anti-forensic diffusion, ESSIV key).

use alloc::vec::Vec;
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use crate::LuksError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// QEMU's hash names (QCryptoHashAlgo) that instar does not implement.
const KNOWN_UNIMPLEMENTED: [&str; 3] = ["md5", "ripemd160", "sm3"];

impl HashAlg {
    /// Look a header's hash name up as QEMU does ("Hash algorithm 'x' not supported"
    /// for names QEMU does not know either).
    pub fn from_name(name: &str) -> Result<HashAlg, LuksError> {
        Ok(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            n if KNOWN_UNIMPLEMENTED.contains(&n) => {
                return Err(LuksError::Unimplemented {
                    what: "hash",
                    name: n.into(),
                })
            }
            n => {
                return Err(LuksError::NameNotSupported {
                    kind: "Hash algorithm",
                    name: n.into(),
                })
            }
        })
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, rounds, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, rounds, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }
}
