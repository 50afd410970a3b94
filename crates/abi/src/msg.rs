//! Request and response messages, encoded with `postcard` into the fixed areas of
//! [`crate::layout`].
//!
//! Byte strings (`Vec<u8>`) carry names exactly as they appear in an image or on the
//! command line; they are not assumed to be UTF-8.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Longest backing file name QEMU stores in a qcow2 header.
pub const MAX_BACKING_NAME: usize = 1023;
/// Longest name the guest reports back (backing file, data file, format); longer names
/// are a guest error, not something the host has to hold.
pub const MAX_REPORTED_NAME: usize = 4096;
/// Longest error or panic message the host accepts from the guest.
pub const MAX_MESSAGE: usize = 1024;

/// Image formats the probe recognises. Only `Raw`, `Qcow2` and `Vmdk` are read;
/// the others are recognised so that they can be refused with a precise message.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Qed,
    Vdi,
    Vpc,
    Vhdx,
    Qcow,
    Luks,
    Parallels,
    Dmg,
    Bochs,
    Cloop,
}

impl Format {
    /// Every format, in probe-independent order.
    pub const ALL: [Format; 13] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Qed,
        Format::Vdi,
        Format::Vpc,
        Format::Vhdx,
        Format::Qcow,
        Format::Luks,
        Format::Parallels,
        Format::Dmg,
        Format::Bochs,
        Format::Cloop,
    ];

    /// QEMU's driver name for this format.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Qed => "qed",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Qcow => "qcow",
            Format::Luks => "luks",
            Format::Parallels => "parallels",
            Format::Dmg => "dmg",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
        }
    }

    /// The format with QEMU driver name `name` (case-sensitive, like QEMU).
    pub fn from_name(name: &[u8]) -> Option<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == name)
    }

    /// Whether instar can read images of this format.
    pub const fn readable(self) -> bool {
        matches!(
            self,
            Format::Raw | Format::Qcow2 | Format::Vmdk | Format::Qed
        )
    }
}

/// One image of a chain, as a device index plus the format it is opened with.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainImage {
    pub dev: u8,
    pub format: Format,
}

/// Everything the host hands the guest at start: the devices and one request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Exact byte length of each device's file, by device index. virtio-blk only
    /// knows whole sectors; reads past this length return zeros.
    pub device_sizes: Vec<u64>,
    pub request: Request,
}

/// What the host asks the guest to do. One request per VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Probe(ProbeRequest),
    Rebase(RebaseRequest),
    SelfTest(SelfTest),
}

/// Identify the image on `dev` and validate it the way QEMU's open does.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    pub dev: u8,
    /// The format to open it as (`-f`, `-F`, or a recorded backing format);
    /// `None` probes like QEMU does.
    pub format: Option<Format>,
    /// Validate as a read-write open (the overlay): e.g. the corrupt bit is refused.
    pub writable: bool,
    /// The image's `encrypt.*` options (`--image-opts`), if any.
    pub key: Option<ImageKey>,
    /// Derive an encrypted image's key (PBKDF2, seconds by design). `false` runs every
    /// other check of the open: the rebase VM derives the key anyway, and the host asks
    /// again with `true` only when a later step fails, to report QEMU's first error.
    pub derive_key: bool,
}

/// Change the backing file of the overlay on device 0.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RebaseRequest {
    /// Format the overlay is opened as; the overlay is always device 0.
    pub overlay_format: Format,
    /// `-u`: rewrite only the backing pointer.
    pub unsafe_mode: bool,
    /// The new backing file; `None` detaches.
    pub new_backing: Option<NewBacking>,
    /// Safe mode: the old chain below the overlay, nearest first.
    pub old_chain: Vec<ChainImage>,
    /// Safe mode: the new chain, the `-b` image first.
    pub new_chain: Vec<ChainImage>,
    /// Safe mode: the `-b` image is `old_chain[i]` (QEMU's in-chain optimisation).
    pub in_chain: Option<u8>,
    /// The host has checked that the overlay's external data file (if it names one)
    /// can be opened, as QEMU's open of the overlay requires. When `false`, an overlay
    /// that names one is refused before anything is written.
    pub data_file_checked: bool,
    /// Report progress with [`crate::layout::DOORBELL_PROGRESS`].
    pub progress: bool,
    /// `-c`: safe mode writes the copied clusters compressed (qcow2 overlays).
    pub compress: bool,
    /// The `encrypt.*` options of the overlay and of old-chain images (`--image-opts`,
    /// `backing.` prefixes), by device.
    pub keys: Vec<ImageKey>,
    /// The zstd release that compresses clusters of zstd images (`INSTAR_ZSTD`).
    pub zstd: crate::ZstdVersion,
}

/// A passphrase for an encrypted image. It never prints (Debug is redacted, there is
/// no Display) and its bytes are wiped when dropped; only the guest reads it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    pub fn new(bytes: Vec<u8>) -> Passphrase {
        Passphrase(bytes)
    }
    /// The bytes, for the key derivation.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl core::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// `encrypt.key-secret`, resolved by the host from the `--object secret` definitions.
/// QEMU looks the secret up only when it opens an encrypted image, so a missing or
/// unusable secret is reported by the guest at that point, in QEMU's words.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum KeySecret {
    Data(Passphrase),
    /// `No secret with id '…'`.
    Unknown(Vec<u8>),
    /// `Data from secret … is not valid UTF-8`.
    NotUtf8(Vec<u8>),
}

/// The `encrypt.*` options of one image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageKey {
    pub dev: u8,
    /// `encrypt.format` as given (`luks`, `aes`, or anything, which QEMU compares
    /// with the header's method).
    pub format: Option<Vec<u8>>,
    /// `encrypt.key-secret`; `None` when not given.
    pub secret: Option<KeySecret>,
}

/// The name (and format) written into the overlay's header, verbatim.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NewBacking {
    pub name: Vec<u8>,
    pub format: Option<Vec<u8>>,
}

/// Operations that exist to test the sandbox itself.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum SelfTest {
    /// Answer with `Response::SelfTest(value)`.
    Echo(u64),
    /// Panic with the given message.
    Panic(String),
    /// Spin forever without any I/O.
    Spin,
    /// Try to write one sector at offset 0 of `dev`; answer with the outcome.
    Write { dev: u8 },
    /// Read `len` bytes at `offset` of `dev`; answer with a checksum (FNV-1a 64).
    Read { dev: u8, offset: u64, len: u32 },
    /// Answer with the `ZSTD_versionString()` of the library the compressor selects for
    /// this release, packed with [`crate::zstd::pack_version`].
    ZstdVersion(crate::ZstdVersion),
    /// Answer with the guest zlib's `zlibVersion()`, packed the same way.
    ZlibVersion,
}

/// What the guest answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Probe(ImageInfo),
    Rebase(RebaseOutcome),
    SelfTest(u64),
    Error(GuestError),
}

/// What a probe found.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// 0 for formats without clusters (raw).
    pub cluster_size: u32,
    /// Format version (qcow2: 2 or 3; vmdk: the header version; raw: 0).
    pub version: u32,
    /// The backing file name recorded in the image, verbatim.
    pub backing_file: Option<Vec<u8>>,
    /// The backing format recorded in the image, verbatim.
    pub backing_format: Option<Vec<u8>>,
    /// qcow2 external data file name, verbatim.
    pub data_file: Option<Vec<u8>>,
    /// vmdk: the first extent file its descriptor names (QEMU opens every one with the
    /// image). `None` for a sparse vmdk whose only extent is the file itself, and for
    /// every other format.
    pub extent_file: Option<Vec<u8>>,
}

/// A finished rebase.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct RebaseOutcome {
    pub stats: RebaseStats,
    /// The overlay's file must end here. virtio-blk writes whole sectors, so a write
    /// that ends inside the last sector can leave the file up to 511 bytes too long;
    /// the host truncates it to this length (never below the length it started with).
    pub overlay_len: Option<u64>,
    /// What QEMU prints to stderr while it repairs a dirty overlay on open, in order.
    /// Numbers only: the host words the lines itself.
    pub repair_lines: Vec<RepairLines>,
}

/// What QEMU says of a cluster whose refcount disagrees with its references.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairVerdict {
    Repairing,
    Error,
    Leaked,
}

/// A run of lines of a dirty overlay's repair.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairLines {
    /// `{verdict} cluster {i} refcount={refcount} reference={reference}` for each
    /// cluster `i` of `first .. first + count`.
    Clusters {
        verdict: RepairVerdict,
        first: u64,
        count: u64,
        refcount: u64,
        reference: u64,
    },
    /// `ERROR refcount block {index} refcount={refcount}`
    BlockRefcount { index: u64, refcount: u64 },
    /// `Rebuilding refcount structure`
    Rebuilding,
    /// `Repairing OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x}
    /// refcount={refcount}`
    CopiedL2 {
        l1_index: u64,
        l1_entry: u64,
        refcount: u64,
    },
    /// `Repairing OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}`
    CopiedData { l2_entry: u64, refcount: u64 },
    /// QEMU's warning for a bitmaps extension without the bitmaps autoclear bit (the
    /// extension is dropped and the bitmaps' clusters leak): `warning: a program lacking
    /// bitmap support modified this file, …` (its v2 wording when `v2`), then `Some
    /// clusters may be leaked, …` without a newline.
    StaleBitmaps { v2: bool },
}

/// Counters of a finished rebase.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebaseStats {
    pub clusters_copied: u64,
    pub bytes_copied: u64,
}

/// How the host should present a guest error.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `Could not open '<file of dev>': <message>`.
    Open { dev: u8 },
    /// `Could not change the backing file to '<name>': <message>`.
    ChangeBacking,
    /// The message alone.
    Plain,
}

/// An error the guest reports; the message is QEMU's wording where QEMU has one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// The encoded message does not fit the area.
    TooLarge,
    /// The length prefix points outside the area.
    BadLength,
    /// The payload is not a valid message.
    Malformed,
}

impl core::fmt::Display for CodecError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CodecError::TooLarge => "message does not fit its area",
            CodecError::BadLength => "message length out of bounds",
            CodecError::Malformed => "malformed message",
        })
    }
}

/// Encode `msg` into `area` as `u32 LE length` + payload. Returns the bytes used.
pub fn encode<T: Serialize>(msg: &T, area: &mut [u8]) -> Result<usize, CodecError> {
    if area.len() < 4 {
        return Err(CodecError::TooLarge);
    }
    let (len_bytes, payload) = area.split_at_mut(4);
    let used = postcard::to_slice(msg, payload)
        .map_err(|_| CodecError::TooLarge)?
        .len();
    len_bytes.copy_from_slice(&(used as u32).to_le_bytes());
    Ok(4 + used)
}

/// Decode a message written by [`encode`]. Looks only at bytes inside `area`.
pub fn decode<'a, T: Deserialize<'a>>(area: &'a [u8]) -> Result<T, CodecError> {
    let payload = framed(area)?;
    postcard::from_bytes(payload).map_err(|_| CodecError::Malformed)
}

/// The payload of a length-prefixed area (also used for panic text).
pub fn framed(area: &[u8]) -> Result<&[u8], CodecError> {
    let len_bytes: [u8; 4] = area
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(CodecError::BadLength)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    area.get(4..4usize.saturating_add(len))
        .ok_or(CodecError::BadLength)
}

/// Write `bytes` into `area` as `u32 LE length` + bytes, truncating to fit.
pub fn frame_bytes(bytes: &[u8], area: &mut [u8]) -> usize {
    if area.len() < 4 {
        return 0;
    }
    let n = bytes.len().min(area.len() - 4);
    area[..4].copy_from_slice(&(n as u32).to_le_bytes());
    area[4..4 + n].copy_from_slice(&bytes[..n]);
    4 + n
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn round_trip() {
        let req = Request::Rebase(RebaseRequest {
            overlay_format: Format::Qcow2,
            unsafe_mode: true,
            new_backing: Some(NewBacking {
                name: b"base.qcow2".to_vec(),
                format: Some(b"qcow2".to_vec()),
            }),
            old_chain: vec![],
            new_chain: vec![ChainImage {
                dev: 1,
                format: Format::Raw,
            }],
            in_chain: None,
            data_file_checked: false,
            progress: false,
            compress: false,
            keys: vec![ImageKey {
                dev: 0,
                format: None,
                secret: Some(KeySecret::Data(Passphrase::new(b"hunter2".to_vec()))),
            }],
            zstd: crate::ZstdVersion::V1_5_4,
        });
        assert!(!alloc::format!("{req:?}").contains("hunter2"));
        let mut area = [0u8; 256];
        let n = encode(&req, &mut area).unwrap();
        assert!(n > 4);
        let back: Request = decode(&area).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn hostile_length_is_refused() {
        let mut area = [0u8; 16];
        area[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(decode::<Response>(&area), Err(CodecError::BadLength));
        area[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode::<Response>(&area), Err(CodecError::BadLength));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut area = [0xffu8; 64];
        area[..4].copy_from_slice(&60u32.to_le_bytes());
        assert!(decode::<Response>(&area).is_err());
    }

    #[test]
    fn format_names() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name().as_bytes()), Some(f));
        }
        assert_eq!(Format::from_name(b"QCOW2"), None);
    }
}
