//! A qemu-io process that keeps an image open, and so holds QEMU's locks on it, for as
//! long as a test needs another process to find the image in use.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// A qemu-io process holding an image open until dropped.
pub struct LockHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl LockHolder {
    /// `qemu-io [-r] -f FMT IMAGE` in `cwd`, returned once the image is open.
    pub fn open(qemu_io: &Path, cwd: &Path, fmt: &str, image: &str, read_only: bool) -> Self {
        let mut cmd = Command::new(qemu_io);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", fmt, image])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let mut stdin = child.stdin.take().expect("qemu-io stdin");
        // The image is opened before the first command is read, so an answer to
        // `length` proves the locks are held.
        stdin.write_all(b"length\n").expect("write to qemu-io");
        stdin.flush().expect("flush qemu-io stdin");
        let mut r = BufReader::new(child.stdout.take().expect("qemu-io stdout"));
        let mut line = String::new();
        r.read_line(&mut line).expect("read from qemu-io");
        assert!(!line.is_empty(), "qemu-io could not open {image}");
        // Keep draining stdout in the background so qemu-io never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        LockHolder {
            child,
            stdin: Some(stdin),
        }
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"quit\n");
        }
        let _ = self.child.wait();
    }
}
