//! The values of `-t`, `-T`, `-f` and `-F`, each parsed once.
//!
//! `-F` is parsed here but judged where qemu-img judges it (after the overlay and, in
//! safe mode, its chain are open): [`BackingFormat::checked`].

use instar_abi::Format;

use super::cmd::{lossy, Cmd, Role};
use crate::drivers;
use crate::failure::Failure;

/// `-F` as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingFormat {
    /// No `-F`: the new backing's format is probed.
    Absent,
    /// A block driver QEMU knows (recorded verbatim, even one instar cannot open).
    Driver(String),
    /// Not a QEMU driver: qemu-img refuses it once the overlay is open.
    Invalid(String),
}

impl BackingFormat {
    fn parse(cmd: &Cmd) -> BackingFormat {
        match cmd.args.backing_format.as_deref().map(lossy) {
            None => BackingFormat::Absent,
            Some(f) if drivers::is_qemu_driver(&f) => BackingFormat::Driver(f),
            Some(f) => BackingFormat::Invalid(f),
        }
    }

    /// qemu-img's check of `-F`: the driver named, if any.
    pub fn checked(&self) -> Result<Option<&str>, Failure> {
        match self {
            BackingFormat::Absent => Ok(None),
            BackingFormat::Driver(f) => Ok(Some(f)),
            BackingFormat::Invalid(f) => Err(Failure::plain(format!("Invalid format name: '{f}'"))),
        }
    }
}

/// The options, checked in qemu-img's order.
pub struct Options {
    /// `-f`: the format the overlay must have (`None`: probe).
    pub overlay_format: Option<Format>,
    pub backing_format: BackingFormat,
}

impl Options {
    /// Check the cache modes and `-f` (before anything is opened, as qemu-img does)
    /// and parse `-F`.
    pub fn parse(cmd: &Cmd) -> Result<Options, Failure> {
        let cache = lossy(&cmd.args.cache);
        if !drivers::is_cache_mode(&cache) {
            return Err(Failure::plain(format!("Invalid cache option: {cache}")));
        }
        let backing_cache = lossy(&cmd.args.backing_cache);
        if !drivers::is_cache_mode(&backing_cache) {
            return Err(Failure::plain(format!(
                "Invalid source cache option: {backing_cache}"
            )));
        }
        Ok(Options {
            overlay_format: overlay_format(cmd)?,
            backing_format: BackingFormat::parse(cmd),
        })
    }
}

/// `-f`: a format the sandbox reads, else QEMU's (or instar's) refusal.
fn overlay_format(cmd: &Cmd) -> Result<Option<Format>, Failure> {
    let Some(f) = cmd.args.format.as_deref().map(lossy) else {
        return Ok(None);
    };
    drivers::format_to_open(f.as_bytes(), f.as_str())
        .map(Some)
        .map_err(|e| Failure::about(&cmd.prefix(Role::Overlay), e))
}
