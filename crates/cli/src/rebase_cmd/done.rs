//! What a finished rebase reports.

use std::ffi::OsString;

use instar_abi::{Format, RebaseStats};

use crate::args::RebaseArgs;

/// Whether the rebase rewrote only the header (`-u`) or compared data first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unsafe,
    Safe,
}

impl Mode {
    pub fn of(args: &RebaseArgs) -> Mode {
        if args.unsafe_mode {
            Mode::Unsafe
        } else {
            Mode::Safe
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Unsafe => "unsafe",
            Mode::Safe => "safe",
        }
    }
}

/// What the header will name: the new backing name (verbatim) and the format recorded
/// with it.
pub type Record = (OsString, String);

/// A finished rebase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub overlay_format: Format,
    pub mode: Mode,
    pub stats: RebaseStats,
    /// `None`: detached.
    pub new_backing: Option<Record>,
}
