//! The path policy for backing file and external data file names read from images
//! (docs/path-policy.md).
//!
//! Backing names inside images are attacker-controlled: an overlay naming `/etc/shadow`
//! (format raw) would make a flattening rebase copy a host secret into the overlay. Before
//! a name found in an image is opened, instar checks that:
//! - it has no protocol prefix (QEMU's `path_has_protocol`);
//! - its lexically normalised absolute path lies inside an allowed directory;
//! - its canonical path (after every symlink) lies inside an allowed directory too;
//! - it is a regular file;
//! - the file opened is the one checked (`O_NOFOLLOW` on the canonical path, then the
//!   opened descriptor's device and inode compared with the checked ones, and the kernel's
//!   own name for the descriptor checked again).
//!
//! A refusal never depends on whether something outside the allowed directories exists:
//! a name that cannot be resolved is followed up to the point where resolution fails, and
//! if that point is outside (or is a symlink leading outside) the refusal is the same
//! "outside" message as for an existing file.
//!
//! The names the user typed (FILE and `-b`) are trusted and not policed here; their
//! directories are allowed.

use std::ffi::OsStr;
use std::fs::{self, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::files::{errno_of, ImageFile, OpenError};
use crate::paths;
use crate::sanitize;

/// The most images a backing chain may hold below the overlay (old chain) or as the new
/// backing and its own chain (new chain). 1 + 2 × 16 devices fit the sandbox's 64.
pub const MAX_CHAIN: usize = 16;

/// Symlinks followed while explaining why a name does not resolve (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What a name found in an image stands for; it only changes the words of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A backing file name (qcow2 header, vmdk `parentFileNameHint`, …).
    BackingFile,
    /// A qcow2 external data file name.
    DataFile,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::BackingFile => "backing file",
            Kind::DataFile => "data file",
        })
    }
}

/// The directories (each with everything below it) where backing files and data files
/// named by images may live. Each directory is kept in two forms, its lexically normalised absolute path
/// and its canonical path, so that names written either way are recognised.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    dirs: Vec<PathBuf>,
}

impl Allowed {
    pub fn new() -> Allowed {
        Allowed::default()
    }

    /// Allow `dir` (relative to `cwd` when relative; empty means `cwd`). Fails when it
    /// cannot be resolved or is not a directory.
    pub fn add(&mut self, cwd: &[u8], dir: &[u8]) -> std::io::Result<()> {
        let dir = if dir.is_empty() { b"." } else { dir };
        let absolute = if dir.first() == Some(&b'/') {
            dir.to_vec()
        } else {
            [cwd, b"/", dir].concat()
        };
        let canonical = fs::canonicalize(OsStr::from_bytes(&absolute))?;
        if !fs::metadata(&canonical)?.is_dir() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let lexical = PathBuf::from(OsStr::from_bytes(&paths::normalise(cwd, dir)));
        for d in [lexical, canonical] {
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        Ok(())
    }

    /// Whether the absolute, normalised or canonical `path` is inside an allowed
    /// directory (component-wise: `/a/bc` is not inside `/a/b`).
    pub fn contains(&self, path: &Path) -> bool {
        self.dirs.iter().any(|d| path.starts_with(d))
    }

    /// Every allowed directory, in both forms.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Why a backing name found in an image is not opened. `Display` is the text after
/// QEMU's "Could not open backing file: " prefixes.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{kind} name '{name}' has a protocol prefix; instar opens local files only")]
    Protocol { kind: Kind, name: String },
    #[error("{kind} name '{name}' is outside the allowed directories (see --allow-dir)")]
    Outside { kind: Kind, name: String },
    #[error("backing file '{filename}' creates an infinite loop")]
    Loop { filename: String },
    #[error(
        "backing file name '{name}' makes the backing chain longer than {MAX_CHAIN} images \
         (instar's limit)"
    )]
    TooDeep { name: String },
    #[error("{kind} '{filename}' changed while it was being opened")]
    Raced { kind: Kind, filename: String },
    /// QEMU's own texts: `Could not open 'X': <strerror>`, not a regular file, …
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// A name that passed the policy, before it is opened.
#[derive(Debug, Clone)]
pub struct Located {
    pub kind: Kind,
    /// The name combined with the directory of the image that names it, as QEMU holds it
    /// (its "filename"; not normalised). Used in messages and for the next name down.
    pub filename: Vec<u8>,
    /// Where it really is.
    pub canonical: PathBuf,
    pub id: FileId,
}

/// How a path resolves under the policy.
enum Resolution {
    Inside(PathBuf),
    Outside,
    Failed(i32),
}

fn realpath(path: &[u8]) -> std::io::Result<PathBuf> {
    fs::canonicalize(OsStr::from_bytes(path))
}

fn join_bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

/// Resolve the absolute `path` (not normalised: `..` after a symlink means what the
/// kernel makes of it) under the policy.
fn resolve(path: &[u8], cwd: &[u8], allowed: &Allowed, hops: usize) -> Resolution {
    let lexical = paths::normalise(cwd, path);
    if !allowed.contains(Path::new(OsStr::from_bytes(&lexical))) {
        return Resolution::Outside;
    }
    let errno = match realpath(path) {
        Ok(c) if allowed.contains(&c) => return Resolution::Inside(c),
        Ok(_) => return Resolution::Outside,
        Err(e) => errno_of(&e),
    };
    // Find the component where resolution stops, and judge the place it stops at: the
    // error is reported only if that place is inside (so nothing is learnt about the
    // world outside), and a symlink there is followed to see where it leads.
    let comps: Vec<&[u8]> = path.split(|&c| c == b'/').collect();
    let mut resolved = PathBuf::from("/");
    for k in 1..comps.len() {
        if matches!(comps[k], b"" | b".") {
            continue;
        }
        match realpath(&join_bytes(&comps[..=k])) {
            Ok(c) => resolved = c,
            Err(e) => {
                if !allowed.contains(&resolved) {
                    return Resolution::Outside;
                }
                let at = resolved.join(OsStr::from_bytes(comps[k]));
                let is_link = fs::symlink_metadata(&at)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                if !is_link {
                    return Resolution::Failed(errno_of(&e));
                }
                if hops >= MAX_SYMLINK_HOPS {
                    return Resolution::Failed(libc::ELOOP);
                }
                let Ok(target) = fs::read_link(&at) else {
                    return Resolution::Failed(errno_of(&e));
                };
                let target = target.as_os_str().as_bytes();
                let mut next = if target.first() == Some(&b'/') {
                    target.to_vec()
                } else {
                    let mut n = resolved.as_os_str().as_bytes().to_vec();
                    n.push(b'/');
                    n.extend_from_slice(target);
                    n
                };
                for rest in &comps[k + 1..] {
                    next.push(b'/');
                    next.extend_from_slice(rest);
                }
                return resolve(&next, cwd, allowed, hops + 1);
            }
        }
    }
    Resolution::Failed(errno)
}

/// Check the backing name `name` recorded in the image whose filename (as QEMU holds it)
/// is `parent`, and find the file it names. `cwd` is the current directory (absolute).
pub fn locate(
    name: &[u8],
    parent: &[u8],
    cwd: &[u8],
    allowed: &Allowed,
) -> Result<Located, Refused> {
    locate_as(Kind::BackingFile, name, parent, cwd, allowed)
}

/// Check the external data file name `name` recorded in an overlay. QEMU opens it as
/// named, relative to the current directory (not to the overlay's directory), and
/// read-write together with the overlay, so a directory fails as QEMU's open does
/// (`Is a directory`); every other rule is the backing files' one.
pub fn locate_data_file(name: &[u8], cwd: &[u8], allowed: &Allowed) -> Result<Located, Refused> {
    locate_as(Kind::DataFile, name, b"", cwd, allowed)
}

fn locate_as(
    kind: Kind,
    name: &[u8],
    parent: &[u8],
    cwd: &[u8],
    allowed: &Allowed,
) -> Result<Located, Refused> {
    if paths::has_protocol(name) {
        return Err(Refused::Protocol {
            kind,
            name: sanitize::name(name),
        });
    }
    let filename = paths::combine(parent, name);
    let absolute = if filename.first() == Some(&b'/') {
        filename.clone()
    } else {
        let mut a = cwd.to_vec();
        a.push(b'/');
        a.extend_from_slice(&filename);
        a
    };
    let canonical = match resolve(&absolute, cwd, allowed, 0) {
        Resolution::Inside(c) => c,
        Resolution::Outside => {
            return Err(Refused::Outside {
                kind,
                name: sanitize::name(name),
            })
        }
        Resolution::Failed(errno) => {
            return Err(Refused::Open(OpenError::Open {
                path: sanitize::name(&filename),
                errno,
            }))
        }
    };
    let meta = fs::metadata(&canonical).map_err(|e| OpenError::Open {
        path: sanitize::name(&filename),
        errno: errno_of(&e),
    })?;
    if kind == Kind::DataFile && meta.is_dir() {
        return Err(Refused::Open(OpenError::Open {
            path: sanitize::name(&filename),
            errno: libc::EISDIR,
        }));
    }
    if !meta.file_type().is_file() {
        return Err(Refused::Open(OpenError::NotRegular {
            path: sanitize::name(&filename),
        }));
    }
    Ok(Located {
        kind,
        filename,
        canonical,
        id: FileId::of(&meta),
    })
}

/// Open a located file read-only, making sure it is the file that was checked.
pub fn open_located(loc: &Located, allowed: &Allowed) -> Result<ImageFile, Refused> {
    let shown_name = sanitize::name(&loc.filename);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&loc.canonical)
        .map_err(|e| OpenError::Open {
            path: shown_name.clone(),
            errno: errno_of(&e),
        })?;
    let meta = file.metadata().map_err(|e| OpenError::Stat {
        errno: errno_of(&e),
    })?;
    if !meta.file_type().is_file() {
        return Err(Refused::Open(OpenError::NotRegular { path: shown_name }));
    }
    if FileId::of(&meta) != loc.id {
        return Err(Refused::Raced {
            kind: loc.kind,
            filename: shown_name,
        });
    }
    // The kernel's name for what was opened: a directory swapped for a symlink between
    // the check and the open shows here.
    if let Ok(actual) = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        if !allowed.contains(&actual) {
            return Err(Refused::Raced {
                kind: loc.kind,
                filename: shown_name,
            });
        }
    }
    Ok(ImageFile {
        file,
        len: meta.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_is_component_wise() {
        let a = Allowed {
            dirs: vec![PathBuf::from("/a/b")],
        };
        assert!(a.contains(Path::new("/a/b")));
        assert!(a.contains(Path::new("/a/b/c/d")));
        assert!(!a.contains(Path::new("/a/bc")));
        assert!(!a.contains(Path::new("/a")));
    }
}
