//! LUKS1 as QEMU reads it (inside qcow2, `encrypt.format=luks`): the header and QEMU's
//! checks on it, the key unlock (PBKDF2, anti-forensic merge, master-key digest) and
//! the sector ciphers the payload is encrypted with.
//!
//! Only AES is implemented (128/192/256 bits, XTS or CBC, plain/plain64/essiv IVs,
//! PBKDF2 over SHA-1 or the SHA-2 family): what `qemu-img create` offers for AES.
//! Every other algorithm QEMU knows is refused with a clear error before any key work.
//! Every work factor read from the header is bounded ([`bounds`]), so a crafted header
//! cannot keep the guest busy for long.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod afsplit;
pub mod bounds;
mod error;
mod hash;
mod header;
mod sector;
mod spec;
mod unlock;

pub use error::LuksError;
pub use hash::HashAlg;
pub use header::{KeySlot, LuksHeader, HEADER_LEN, SECTOR_SIZE};
pub use sector::SectorCipher;
pub use spec::{CipherSpec, IvGen, Mode};
pub use unlock::{unlock, MasterKey};
