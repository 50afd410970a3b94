//! The directories the path policy allows ([`crate::policy`]), and the current directory
//! names are resolved against.

use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::args::RebaseArgs;
use crate::failure::Failure;
use crate::files;
use crate::paths;
use crate::policy::Allowed;

use super::cmd::lossy;

/// The current directory and the allowed directories.
pub struct Dirs {
    /// Absolute; empty in unsafe mode without `--allow-dir` (nothing is resolved then).
    pub cwd: Vec<u8>,
    pub allowed: Allowed,
}

impl Dirs {
    /// `--allow-dir`, checked before anything is opened. Names are resolved against the
    /// current directory only in safe mode (or for `--allow-dir`).
    pub fn from_args(args: &RebaseArgs) -> Result<Dirs, Failure> {
        let cwd = if args.unsafe_mode && args.allow_dirs.is_empty() {
            Vec::new()
        } else {
            current_dir()?
        };
        let allowed = allowed_from_args(args, &cwd)?;
        Ok(Dirs { cwd, allowed })
    }

    /// The directories for an external data file, whose name QEMU resolves against the
    /// current directory in either mode: `--allow-dir` and the defaults.
    pub fn for_data_file(args: &RebaseArgs) -> Result<Dirs, Failure> {
        let cwd = current_dir()?;
        let allowed = allowed_from_args(args, &cwd)?;
        let mut dirs = Dirs { cwd, allowed };
        dirs.add_defaults(args);
        Ok(dirs)
    }

    /// Add the default allowed directories: FILE's directory, and the directory of the
    /// `-b` file as resolved against it (when it exists; a missing one fails later with
    /// QEMU's text). Both are trusted because the user named them.
    pub fn add_defaults(&mut self, args: &RebaseArgs) {
        // FILE was opened, so its directory exists.
        let _ = self
            .allowed
            .add(&self.cwd, paths::dirname(args.file.as_bytes()));
        if !args.backing.is_empty() {
            if let Ok(b) = paths::resolve_backing(&args.file, &args.backing) {
                let _ = self
                    .allowed
                    .add(&self.cwd, paths::dirname(b.as_os_str().as_bytes()));
            }
        }
    }
}

/// The current directory as bytes (backing names are resolved against it, as the kernel
/// resolves them).
fn current_dir() -> Result<Vec<u8>, Failure> {
    std::env::current_dir()
        .map(|d| d.into_os_string().into_vec())
        .map_err(|e| {
            Failure::plain(format!(
                "Could not determine the current directory: {}",
                files::io_text(&e)
            ))
        })
}

/// The allowed directories named by `--allow-dir`, in command-line order.
fn allowed_from_args(args: &RebaseArgs, cwd: &[u8]) -> Result<Allowed, Failure> {
    let mut allowed = Allowed::new();
    for dir in &args.allow_dirs {
        allowed.add(cwd, dir.as_bytes()).map_err(|e| {
            Failure::plain(format!(
                "Could not use --allow-dir '{}': {}",
                lossy(dir),
                files::io_text(&e)
            ))
        })?;
    }
    Ok(allowed)
}
