//! A file's data/hole layout, read and written in-process (no `python3` or `fallocate`
//! process per call: the writer tests ask for it thousands of times).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The file's data extents `(start, end)` as SEEK_DATA/SEEK_HOLE report them.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).expect("open");
    let len = f.metadata().expect("metadata").len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek on a file descriptor owned by `f`, which outlives the calls.
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            break;
        }
        out.push((d as u64, h as u64));
        pos = h;
    }
    out
}

/// `fallocate -z`: zero `len` bytes at `offset`, letting the file system deallocate them.
pub fn zero_range(f: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a file descriptor owned by `f`; it reads no memory of ours.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(
        r,
        0,
        "fallocate zero range {offset}+{len}: {}",
        std::io::Error::last_os_error()
    );
}
