//! Scratch space under the system temp directory, removed on drop; kept for inspection
//! when the test is failing (dropped while panicking) or `INSTAR_KEEP_SCRATCH=1`. Names carry the process id and a counter, so parallel
//! tests and test binaries never share one.

use std::fs::{File, OpenOptions};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::skip::required;

fn fresh_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "instar-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn keep() -> bool {
    std::thread::panicking() || required("INSTAR_KEEP_SCRATCH")
}

/// A fresh, empty directory.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let d = fresh_path(tag);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create scratch dir");
        Scratch(d)
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A fresh directory holding a copy of everything in `src`.
    pub fn copy_of(src: &Path, tag: &str) -> Scratch {
        let d = Scratch::new(tag);
        copy_tree(src, &d);
        d
    }
}

/// Copy the tree under `src` into `dst` (created if missing): files with their bytes
/// (holes kept where the file system copies them so), subdirectories recursively,
/// symbolic links as links.
pub fn copy_tree(src: &Path, dst: &Path) {
    copy_tree_with(src, dst, false)
}

/// [`copy_tree`] writing every byte of every file (no holes in the copies).
pub fn copy_tree_dense(src: &Path, dst: &Path) {
    copy_tree_with(src, dst, true)
}

fn copy_tree_with(src: &Path, dst: &Path, dense: bool) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("dir entry");
        let ty = e.file_type().expect("file type");
        let to = dst.join(e.file_name());
        if ty.is_dir() {
            copy_tree_with(&e.path(), &to, dense);
        } else if ty.is_symlink() {
            let target = std::fs::read_link(e.path()).expect("readlink");
            std::os::unix::fs::symlink(target, &to).expect("symlink");
        } else if dense {
            let bytes = std::fs::read(e.path()).expect("read");
            std::fs::write(&to, bytes).expect("write");
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !keep() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A scratch file holding `contents`.
pub struct ScratchFile(pub PathBuf);

impl ScratchFile {
    pub fn new(tag: &str, contents: &[u8]) -> ScratchFile {
        let path = fresh_path(tag);
        std::fs::write(&path, contents).expect("write scratch file");
        ScratchFile(path)
    }

    /// The file opened read-only, or read-write when `writable`.
    pub fn open(&self, writable: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&self.0)
            .expect("open scratch file")
    }

    pub fn read_only(&self) -> File {
        self.open(false)
    }

    pub fn read_write(&self) -> File {
        self.open(true)
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("read scratch file")
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if !keep() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
