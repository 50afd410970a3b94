//! Opening image files the way QEMU's `file` driver does, with its error texts.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The C library's text for `errno` (what QEMU prints), without Rust's " (os error N)".
pub fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length, which is what we pass; the XSI
    // `strerror_r` the libc crate binds NUL-terminates within that length on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        if let Ok(s) = CStr::from_bytes_until_nul(&buf) {
            return s.to_string_lossy().into_owned();
        }
    }
    format!("Unknown error {errno}")
}

/// The errno of an I/O error (EIO when it carries none).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The C library's text for an I/O error, as QEMU prints it.
pub fn io_text(e: &io::Error) -> String {
    strerror(errno_of(e))
}

/// Why an image file could not be opened. `Display` is the text QEMU's `file` driver
/// gives (which callers prefix with their own "Could not open 'X': ").
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `open(2)` failed.
    #[error("Could not open '{path}': {}", strerror(*.errno))]
    Open { path: String, errno: i32 },
    /// `fstat(2)` failed.
    #[error("Could not stat file: {}", strerror(*.errno))]
    Stat { errno: i32 },
    /// Not a regular file (QEMU would pick another driver or refuse; instar refuses).
    #[error("'file' driver requires '{path}' to be a regular file")]
    NotRegular { path: String },
}

impl OpenError {
    /// The errno behind the failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            OpenError::Open { errno, .. } | OpenError::Stat { errno } => Some(*errno),
            OpenError::NotRegular { .. } => None,
        }
    }
}

/// An open image file and the length it had when opened.
#[derive(Debug)]
pub struct ImageFile {
    pub file: File,
    pub len: u64,
}

/// Open `path` read-write (the overlay) or read-only (a backing file), like QEMU's
/// `raw_open_common`: `O_CLOEXEC`, and `O_NONBLOCK` so that a FIFO cannot hang the open
/// (it is refused right after as not regular). Only regular files are accepted.
///
/// For names the user typed (FILE, `-b`), which messages show as typed, like qemu-img.
/// Names read from images are opened through the path policy (`policy.rs`) instead,
/// which escapes them.
pub fn open_image(path: &Path, writable: bool) -> Result<ImageFile, OpenError> {
    let shown = path.to_string_lossy().into_owned();
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| OpenError::Open {
            path: shown.clone(),
            errno: errno_of(&e),
        })?;
    let meta = file.metadata().map_err(|e| OpenError::Stat {
        errno: errno_of(&e),
    })?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular { path: shown });
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
    fn strerror_texts() {
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
        assert_eq!(strerror(libc::EISDIR), "Is a directory");
        assert_eq!(strerror(libc::ENOTSUP), "Operation not supported");
    }

    #[test]
    fn open_errors_read_like_qemu() {
        let e = open_image(Path::new("/nonexistent/x.qcow2"), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open '/nonexistent/x.qcow2': No such file or directory"
        );
        let e = open_image(Path::new("/"), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "'file' driver requires '/' to be a regular file"
        );
        let e = open_image(Path::new("/"), true).unwrap_err();
        assert_eq!(e.to_string(), "Could not open '/': Is a directory");
    }
}
