//! What the overlap proof names: structures, who names them, and why a write or an
//! image is refused.

use alloc::string::String;
use core::fmt;

use instar_blockdev::IoError;

use crate::writer::WriteKind;

/// A metadata structure, in QEMU's overlap-check terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Structure {
    MainHeader,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    BitmapDirectory,
    /// A bitmap's table, and a cluster of a bitmap's data (`crate::bitmaps`).
    BitmapTable,
    BitmapData,
    /// The encryption (LUKS) header and key material, named by the crypto header
    /// extension. QEMU's overlap check does not know it; instar's does.
    CryptoHeader,
}

impl Structure {
    /// QEMU's name (`metadata_ol_names`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Structure::MainHeader => "qcow2_header",
            Structure::ActiveL1 => "active L1 table",
            Structure::ActiveL2 => "active L2 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "snapshot table",
            Structure::InactiveL1 => "inactive L1 table",
            Structure::InactiveL2 => "inactive L2 table",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::BitmapTable => "bitmap table",
            Structure::BitmapData => "bitmap data cluster",
            Structure::CryptoHeader => "encryption header",
        }
    }

    /// How directly the image names the structure: the header names the L1 table, the
    /// refcount table and the snapshot table; they name the rest. Of two overlapping
    /// structures the more directly named one is reported as the one overlapped.
    pub(super) fn rank(self) -> u8 {
        match self {
            Structure::MainHeader => 0,
            Structure::ActiveL1
            | Structure::RefcountTable
            | Structure::SnapshotTable
            | Structure::BitmapDirectory
            | Structure::CryptoHeader => 1,
            Structure::RefcountBlock | Structure::BitmapTable => 2,
            Structure::BitmapData => 3,
            Structure::ActiveL2 => 3,
            Structure::InactiveL1 => 4,
            Structure::InactiveL2 => 5,
        }
    }

    pub(super) fn is_l2(self) -> bool {
        matches!(self, Structure::ActiveL2 | Structure::InactiveL2)
    }
}

/// What a reference points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Structure(Structure),
    Data,
    Compressed,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Structure(s) => f.write_str(s.qemu_name()),
            Target::Data => f.write_str("data cluster"),
            Target::Compressed => f.write_str("compressed cluster"),
        }
    }
}

/// Who names a structure or a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referrer {
    Header,
    /// Entry `index` of the active L1 table (`snapshot: None`) or of a snapshot's.
    L1 {
        snapshot: Option<u32>,
        index: u64,
    },
    Reftable {
        index: u64,
    },
    /// Snapshot table entry `index` (its L1 table).
    Snapshot {
        index: u32,
    },
    /// Entry `index` of the L2 table at `table`.
    L2 {
        table: u64,
        index: u64,
    },
    /// Entry `index` of the bitmap directory.
    BitmapDirectory {
        index: u32,
    },
    /// Entry `index` of the bitmap table at `table`.
    BitmapTable {
        table: u64,
        index: u64,
    },
}

impl fmt::Display for Referrer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Referrer::Header => f.write_str("named by the header"),
            Referrer::L1 {
                snapshot: None,
                index,
            } => write!(f, "named by active L1 entry {index:#x}"),
            Referrer::L1 {
                snapshot: Some(s),
                index,
            } => write!(f, "named by L1 entry {index:#x} of snapshot {s}"),
            Referrer::Reftable { index } => write!(f, "named by refcount table entry {index:#x}"),
            Referrer::Snapshot { index } => write!(f, "named by snapshot {index}"),
            Referrer::L2 { table, index } => {
                write!(f, "named by L2 entry {index:#x} of the table at {table:#x}")
            }
            Referrer::BitmapDirectory { index } => {
                write!(f, "named by bitmap directory entry {index}")
            }
            Referrer::BitmapTable { table, index } => {
                write!(
                    f,
                    "named by entry {index:#x} of the bitmap table at {table:#x}"
                )
            }
        }
    }
}

/// One thing at one place: `target` at `offset` (+`len`), named by `by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub target: Target,
    pub offset: u64,
    pub by: Referrer,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} at {:#x} ({})", self.target, self.offset, self.by)
    }
}

fn write_what(kind: WriteKind) -> &'static str {
    match kind {
        WriteKind::Header => "a header",
        WriteKind::ActiveL1 => "an L1 entry",
        WriteKind::L2Table => "an L2 table",
        WriteKind::RefcountTable => "a refcount table",
        WriteKind::RefcountBlock => "a refcount block",
        WriteKind::Data => "a data",
        WriteKind::BitmapDirectory => "a bitmap directory",
        WriteKind::BitmapTable => "a bitmap table",
        WriteKind::BitmapData => "a bitmap data",
        WriteKind::BitmapDiscard => "a bitmap discard",
    }
}

/// Why the writes are refused. Every message ends the same way: nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlapError {
    /// A write of `kind` at cluster `at` would land on `on`.
    #[error("{}: {} write at {at:#x} would land on {on}; nothing was written", prevent(on.target), write_what(*kind))]
    Write { kind: WriteKind, at: u64, on: Found },
    /// The allocator would take cluster `at` (refcount 0) although `on` uses it.
    #[error("{}: cluster {at:#x} has refcount 0, so it would be allocated, but it holds {on}; nothing was written", prevent(on.target))]
    TakenInUse { at: u64, on: Found },
    /// The session would write through a table or cluster that two entries name.
    #[error("{}: {first} and {second} are one {}, which the rebase would write through; nothing was written", prevent(first.target), first.target)]
    Shared { first: Found, second: Found },
    /// Two structures (or a structure and data) overlap.
    #[error("{}: {a} overlaps with {b}; nothing was written", prevent(b.target))]
    Overlap { a: Found, b: Found },
    /// A structure named at cluster 0 or past the end of the file.
    #[error("{} at {offset:#x} ({by}) {}; nothing was written", target_cap(*target), if *offset == 0 { "is at offset 0" } else { "lies outside the image file" })]
    Misplaced {
        target: Target,
        offset: u64,
        by: Referrer,
    },
    /// A structure's offset or size is invalid.
    #[error("{what} ({by}) is invalid: offset {offset:#x}, {len:#x} bytes; nothing was written")]
    Invalid {
        what: &'static str,
        offset: u64,
        len: u64,
        by: Referrer,
    },
    /// A metadata write in place on a cluster that nothing names.
    #[error("Preventing invalid write: {} write at {at:#x} would land on a cluster that nothing in the image names; nothing was written", write_what(*kind))]
    Unnamed { kind: WriteKind, at: u64 },
    /// The bitmaps were not loaded ([`crate::bitmaps::BitmapSet`]) for an image that has them.
    #[error("the image's persistent bitmaps were not loaded")]
    Bitmaps,
    #[error(transparent)]
    Io(#[from] IoError),
}

/// QEMU's words for a write refused because of what lies under it.
fn prevent(target: Target) -> String {
    match target {
        Target::Structure(s) => alloc::format!(
            "Preventing invalid write on metadata (overlaps with {})",
            s.qemu_name()
        ),
        Target::Data | Target::Compressed => String::from("Preventing invalid write on data"),
    }
}

fn target_cap(t: Target) -> String {
    let s = alloc::format!("{t}");
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => s,
    }
}
