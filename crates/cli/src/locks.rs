//! Image locking compatible with QEMU's `file-posix` driver, so that instar and QEMU
//! (qemu-img, qemu-io, qemu-nbd, a running VM) keep each other off an image in use.
//!
//! QEMU expresses "I use permission P" as a shared OFD byte-range lock on byte `100 + bit`
//! and "I do not let others have P" as one on byte `200 + bit` (`raw_apply_lock_bytes`).
//! Every lock is `F_RDLCK`, so holders never block each other; conflicts are found by
//! testing (`F_OFD_GETLK` with `F_WRLCK`) whether anybody else holds the byte that would
//! contradict us (`raw_check_lock_bytes`): for each permission we use, the matching
//! "unshared" byte; for each permission we do not share, the matching "used" byte.
//! The locks belong to the open file description and go away when the file is closed.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::files::strerror;

/// `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`.
pub const PERM_WRITE: u8 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u8 = 0x04;
/// `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u8 = 0x08;
/// `BLK_PERM_ALL`.
pub const PERM_ALL: u8 = 0x0f;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What an open uses and what it lets others use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub used: u8,
    pub shared: u8,
}

/// The overlay, as `qemu-img rebase` opens it (`blk_new_open` with `BDRV_O_RDWR`): uses
/// consistent read, write and resize; shares only consistent read and write-unchanged.
/// Observed with strace on qemu-img 10.2.2: locks 100, 101, 103, 201, 203.
pub const OVERLAY: Perms = Perms {
    used: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
    shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
};

/// A backing file opened for reading (qemu-img's read-only opens): uses consistent read
/// and lets nobody write or resize. Locks 100, 201, 203.
pub const READER: Perms = Perms {
    used: PERM_CONSISTENT_READ,
    shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
};

/// QEMU's `bdrv_perm_names` for a single permission bit.
fn perm_name(bit: u8) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

/// Why the locks could not be taken. `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Setting a lock byte failed (someone holds an exclusive lock on it).
    #[error("Failed to lock byte {offset}{}", errno_suffix(*.errno))]
    LockByte { offset: i64, errno: i32 },
    /// Another process does not share a permission we use.
    #[error("Failed to get \"{}\" lock{}", perm_name(*.perm), errno_suffix(*.errno))]
    Used { perm: u8, errno: i32 },
    /// Another process uses a permission we do not share.
    #[error("Failed to get shared \"{}\" lock{}", perm_name(*.perm), errno_suffix(*.errno))]
    Unshared { perm: u8, errno: i32 },
}

impl LockError {
    /// Whether QEMU would add its "Is another process using the image" hint: only when
    /// the locks were set and the test found a conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, LockError::Used { .. } | LockError::Unshared { .. })
    }
}

/// `raw_lock_error_setg_errno`: EAGAIN and EACCES (a conflict) carry no errno text.
fn errno_suffix(errno: i32) -> String {
    if errno == libc::EAGAIN || errno == libc::EACCES {
        String::new()
    } else {
        format!(": {}", strerror(errno))
    }
}

fn flock(kind: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Take a shared lock on one byte. Returns the errno on failure.
fn lock_byte(file: &File, start: i64) -> Result<(), i32> {
    let mut fl = flock(libc::F_RDLCK, start);
    loop {
        // SAFETY: F_OFD_SETLK reads a valid `flock` we own; the fd is open for `file`'s life.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if rc == 0 {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

/// Whether another open file description holds any lock on one byte (0 = free).
fn test_byte(file: &File, start: i64) -> Result<(), i32> {
    let mut fl = flock(libc::F_WRLCK, start);
    // SAFETY: F_OFD_GETLK reads and writes a valid `flock` we own; the fd is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        Ok(())
    } else {
        Err(libc::EAGAIN)
    }
}

fn bits(mask: u8) -> impl Iterator<Item = (i64, u8)> {
    (0..4).filter_map(move |i| {
        let bit = 1u8 << i;
        (mask & bit != 0).then_some((i as i64, bit))
    })
}

/// Release one byte (only ever one we set; failures leave nothing to undo).
fn unlock_byte(file: &File, start: i64) {
    let mut fl = flock(libc::F_UNLCK, start);
    // SAFETY: F_OFD_SETLK reads a valid `flock` we own; the fd is open for `file`'s life.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

/// Lock `file` for `perms` the way QEMU does when it opens an image: set the "used" and
/// "unshared" bytes, then test for conflicting holders in QEMU's order, so that the first
/// conflict reported is the one QEMU would report. On failure every byte set here is
/// released again (QEMU's `RAW_PL_ABORT`); on success the locks last as long as `file`.
pub fn lock_image(file: &File, perms: Perms) -> Result<(), LockError> {
    let offsets: Vec<i64> = bits(perms.used)
        .map(|(i, _)| PERM_BASE + i)
        .chain(bits(!perms.shared & PERM_ALL).map(|(i, _)| SHARED_BASE + i))
        .collect();
    let result = set_and_check(file, perms, &offsets);
    if result.is_err() {
        for &offset in &offsets {
            unlock_byte(file, offset);
        }
    }
    result
}

fn set_and_check(file: &File, perms: Perms, offsets: &[i64]) -> Result<(), LockError> {
    for &offset in offsets {
        lock_byte(file, offset).map_err(|errno| LockError::LockByte { offset, errno })?;
    }
    for (i, perm) in bits(perms.used) {
        test_byte(file, SHARED_BASE + i).map_err(|errno| LockError::Used { perm, errno })?;
    }
    for (i, perm) in bits(!perms.shared & PERM_ALL) {
        test_byte(file, PERM_BASE + i).map_err(|errno| LockError::Unshared { perm, errno })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("instar-locks-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn writer_excludes_writer_and_reader() {
        let (path, a) = temp_file("ww");
        lock_image(&a, OVERLAY).unwrap();
        let b = File::options().read(true).write(true).open(&path).unwrap();
        let e = lock_image(&b, OVERLAY).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        assert!(e.is_conflict());
        let c = File::open(&path).unwrap();
        let e = lock_image(&c, READER).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        drop(a);
        // Closing the holder releases everything.
        lock_image(&c, READER).unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn readers_share() {
        let (path, a) = temp_file("rr");
        lock_image(&a, READER).unwrap();
        let b = File::open(&path).unwrap();
        lock_image(&b, READER).unwrap();
        let w = File::options().read(true).write(true).open(&path).unwrap();
        assert_eq!(
            lock_image(&w, OVERLAY).unwrap_err().to_string(),
            "Failed to get \"write\" lock"
        );
        let _ = std::fs::remove_file(path);
    }
}
