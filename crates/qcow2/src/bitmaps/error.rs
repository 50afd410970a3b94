//! Why an image's persistent bitmaps cannot be opened or re-stored. QEMU's own
//! refusals read as QEMU words them; instar's extra refusals (metadata QEMU would
//! accept but that a crafted image uses to aim writes or exhaust memory) say what was
//! found.

use alloc::string::String;
use core::fmt::Write as _;

use instar_blockdev::IoError;

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("Requested bitmap directory size is zero")]
    DirectorySizeZero,
    #[error("Broken bitmap directory")]
    BrokenDirectory,
    #[error("More bitmaps found than specified in header extension")]
    MoreBitmaps,
    #[error("Less bitmaps found than specified in header extension")]
    LessBitmaps,
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    /// `name` as QEMU prints it: the name field up to its first NUL.
    #[error("Bitmap '{}' doesn't satisfy the constraints", show(name))]
    Constraints { name: alloc::vec::Vec<u8> },
    #[error("Bitmap already exists: {}", show(name))]
    Duplicate { name: alloc::vec::Vec<u8> },
    #[error(
        "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
        show(name)
    )]
    BadTable { name: alloc::vec::Vec<u8> },
    #[error("Could not read bitmap '{}' from image: Invalid argument", show(name))]
    BadData { name: alloc::vec::Vec<u8> },
    /// The in-place update of the IN_USE flags would not give a directory of the same
    /// size (a name with a NUL inside).
    #[error("Can't update bitmap directory: Invalid argument")]
    InPlaceUpdate,
    /// instar's bound on the bitmap tables held in memory.
    #[error("the bitmaps' tables hold {entries} entries in all, more than instar handles ({max}); nothing was written")]
    TooLarge { entries: u64, max: u64 },
    /// A bitmap structure QEMU would read as zeros or write over: past the end of the
    /// file, or where the image's refcounts say nothing is.
    #[error(
        "the {what} of bitmap '{}' at {offset:#x} {why}; nothing was written",
        show(name)
    )]
    Misplaced {
        what: &'static str,
        name: alloc::vec::Vec<u8>,
        offset: u64,
        why: &'static str,
    },
    #[error("error while reading the bitmaps: {0}")]
    Io(#[from] IoError),
}

/// A name as QEMU's `%s`/`%.*s` prints it: up to the first NUL, with every byte
/// outside printable ASCII shown as `\xNN` (the project's escaping rule, which the host
/// applies again without change), so a crafted name cannot forge output.
fn show(name: &[u8]) -> String {
    let mut out = String::new();
    for &b in instar_blockdev::bytes::c_str(name) {
        match b {
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}
