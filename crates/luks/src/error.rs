//! Why a LUKS header cannot be used or a key not unlocked. Texts are QEMU's where QEMU
//! has one (the CLI prefixes them with the image name, as qemu-img does).

use alloc::string::String;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LuksError {
    #[error("Volume is not in LUKS format")]
    NotLuks,
    #[error("LUKS version {0} is not supported")]
    Version(u16),
    #[error("LUKS header {0} is not NUL terminated")]
    NotTerminated(&'static str),
    #[error("LUKS payload is overlapping with the header")]
    PayloadOverlapsHeader,
    #[error("LUKS key iteration count is zero")]
    MasterIterationsZero,
    #[error("Keyslot {slot} is corrupted (stripes {stripes} != 4000)")]
    Stripes { slot: usize, stripes: i32 },
    #[error("Keyslot {0} state (active/disable) is corrupted")]
    SlotState(usize),
    #[error("Keyslot {0} iteration count is zero")]
    SlotIterationsZero(usize),
    #[error("Keyslot {0} is overlapping with the LUKS header")]
    SlotOverlapsHeader(usize),
    #[error("Keyslot {0} is overlapping with the encrypted payload")]
    SlotOverlapsPayload(usize),
    #[error("Keyslots {0} and {1} are overlapping in the header")]
    SlotsOverlap(usize, usize),
    #[error("Unexpected cipher mode string format '{0}'")]
    ModeFormat(String),
    /// `kind` is QEMU's: "Cipher mode", "Hash algorithm", "IV generator".
    #[error("{kind} '{name}' not supported")]
    NameNotSupported { kind: &'static str, name: String },
    #[error("Algorithm '{name}' with key size {key_bytes} bytes not supported")]
    KeySize { name: String, key_bytes: i32 },
    #[error("Missing IV generator hash specification")]
    MissingIvHash,
    #[error("No AES cipher with key size {0} available")]
    EssivKeySize(usize),
    /// An algorithm QEMU knows but instar does not implement (only AES is).
    #[error("LUKS {what} '{name}' is not supported by instar (only AES in XTS or CBC mode with plain, plain64 or essiv IVs and SHA-1/SHA-2 hashes)")]
    Unimplemented { what: &'static str, name: String },
    /// A work factor past instar's bound (`bounds`).
    #[error("LUKS {what} {value} exceeds instar's limit of {limit}")]
    TooMuchWork {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// QEMU asserts (and aborts) on such key material: aes-192 in CBC mode.
    #[error("LUKS key material of {0} bytes is not a whole number of 512-byte sectors")]
    MaterialNotSectors(usize),
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// QEMU's `qcow2_crypto_hdr_read_func`: a read past the extension's length.
    #[error("Request for data outside of extension header")]
    OutsideExtension,
    #[error("Could not read encryption header")]
    Io(instar_blockdev::IoError),
}
