//! Why QEMU would refuse to open a qcow2 image, in its words.

use alloc::string::String;

/// Why QEMU would refuse to open the image. The text is QEMU's message (the part
/// after `Could not open '<file>': `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("Could not read qcow2 header: Input/output error")]
    ReadHeader,
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    #[error("Unsupported cluster size: 2^{0}")]
    UnsupportedClusterSize(u32),
    #[error("qcow2 header too short")]
    HeaderTooShort,
    #[error("qcow2 header exceeds cluster size")]
    HeaderExceedsCluster,
    #[error("Invalid backing file offset")]
    InvalidBackingFileOffset,
    #[error("qcow2: unknown compression type: {0}")]
    UnknownCompressionType(u8),
    #[error("qcow2: Compression type incompatible feature bit must not be set")]
    CompressionBitSet,
    #[error("qcow2: Compression type incompatible feature bit must be set")]
    CompressionBitMissing,
    /// The list of features, formatted as QEMU does.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeatures(String),
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    Corrupt,
    #[error("Unsupported subcluster size: {0}")]
    UnsupportedSubclusterSize(u64),
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrderTooLarge,
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    #[error("{0} too large")]
    TableTooLarge(&'static str),
    #[error("{0} offset invalid")]
    TableOffsetInvalid(&'static str),
    #[error("Image is too big")]
    TooBig,
    #[error("L1 table is too small")]
    L1TooSmall,
    #[error("Could not read L1 table: Input/output error")]
    ReadL1,
    /// `%d` of an unsigned field, as QEMU prints it.
    #[error("Unsupported encryption method {}", *.0 as i32)]
    UnsupportedEncryption(u32),
    #[error("Could not initialize refcount handling: Input/output error")]
    ReadRefcountTable,
    #[error("Header extension too large")]
    ExtensionTooLarge,
    #[error("ERROR: ext_backing_format: len={0} too large (>=16)")]
    BackingFormatTooLarge(u32),
    #[error("CRYPTO header extension only expected with LUKS encryption method")]
    CryptoNotLuks,
    #[error("CRYPTO header extension size {0}, but expected size 16")]
    CryptoHeaderSize(u32),
    #[error(
        "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
    )]
    CryptoHeaderOffset { offset: u64, cluster_size: u64 },
    /// Encrypted images need a secret, which instar (like a bare `qemu-img`) never has.
    #[error("Parameter 'encrypt.key-secret' is required for cipher")]
    SecretRequired,
    #[error("bitmaps_ext: Invalid extension length")]
    BitmapsExtLength,
    #[error("bitmaps_ext: Reserved field is not zero")]
    BitmapsReserved,
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    TooManyBitmaps(u32),
    #[error("found bitmaps extension with zero bitmaps")]
    ZeroBitmaps,
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    BitmapDirectoryOffset,
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67107840)"
    )]
    BitmapDirectorySize(u64),
    #[error("'data-file' is required for this image")]
    DataFileRequired,
    #[error("data-file-raw requires a data file")]
    DataFileRawWithoutDataFile,
    #[error("Missing CRYPTO header for crypt method {}", *.0 as i32)]
    MissingCryptoHeader(u32),
    #[error("Backing file name too long")]
    BackingNameTooLong,
    /// QEMU adds the hint on its own line.
    #[error("Too much extra metadata in snapshot table entry {0}\nYou can force-remove this extra metadata with qemu-img check -r all")]
    SnapshotExtraData(u32),
    #[error("Snapshot table is too big\nYou can force-remove all {0} overhanging snapshots with qemu-img check -r all")]
    SnapshotTableTooBig(u32),
    #[error("Failed to read snapshot table: Input/output error")]
    ReadSnapshots,
    /// The read-write open rewrites the header to clear unknown autoclear bits, and
    /// the rewritten header does not fit.
    #[error("Could not update qcow2 header: No space left on device")]
    HeaderUpdateNoSpace,
    /// The block layer's check after the driver opened the image.
    #[error("Could not refresh total sector count: File too large")]
    SizeTooLarge,
}
