//! A failed command, and the one way each kind of failure is worded.
//!
//! Every error the command prints is built here, so that a kind of failure (a refused
//! file, a lock conflict, a guest refusal, a sandbox that gave no answer) reads the same
//! wherever it happens. Texts are QEMU's where qemu-img has one.

use std::fmt::Display;
use std::io;

use instar_abi::ErrorKind;

use crate::files;
use crate::guest::{Refusal, RunError};
use crate::locks::LockError;
use crate::sanitize;

/// A failed command: the text after "instar: " (it may span lines, e.g. QEMU's lock
/// hint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub text: String,
    /// qemu-img reaches its final `qemu_progress_print(100, 0)` for this error (errors of
    /// the backing-file change itself), so `-p` prints `(100.00/100%)` before the newline.
    pub at_change: bool,
    /// A sandbox that gave no answer (watchdog, deadline, crash): the command ends at
    /// once, no further VM runs.
    pub sandbox: bool,
}

impl Failure {
    /// A message that stands alone.
    pub fn plain(text: impl Into<String>) -> Failure {
        Failure {
            text: text.into(),
            at_change: false,
            sandbox: false,
        }
    }

    /// A failure about one file: `prefix` names it (`Could not open 'X': `), `what` says
    /// what went wrong.
    pub fn about(prefix: &str, what: impl Display) -> Failure {
        Failure::plain(format!("{prefix}{what}"))
    }

    /// An error of the backing-file change itself, naming `-b` as typed.
    pub fn change(backing: &str, why: impl Display) -> Failure {
        Failure {
            text: format!("Could not change the backing file to '{backing}': {why}"),
            at_change: true,
            sandbox: false,
        }
    }

    /// A lock that could not be taken, with QEMU's hint naming the file when another
    /// process holds it.
    pub fn lock(prefix: &str, shown_path: &str, e: &LockError) -> Failure {
        let mut text = format!("{prefix}{e}");
        if e.is_conflict() {
            text.push_str(&format!(
                "\nIs another process using the image [{shown_path}]?"
            ));
        }
        Failure::plain(text)
    }

    /// QEMU's `Could not stat file` for a file whose messages start with `prefix`.
    pub fn stat(prefix: &str, e: &io::Error) -> Failure {
        Failure::about(
            prefix,
            format!("Could not stat file: {}", files::io_text(e)),
        )
    }

    /// A system call on a named file (`Could not truncate 'FILE': …`).
    pub fn io(action: &str, file: &str, e: &io::Error) -> Failure {
        Failure::plain(format!(
            "Could not {action} '{file}': {}",
            files::io_text(e)
        ))
    }

    /// A guest refusal about a file whose messages start with `prefix`; plain messages
    /// stand alone.
    pub fn refused(prefix: &str, r: &Refusal) -> Failure {
        match r.kind {
            ErrorKind::Plain => Failure::plain(r.message.clone()),
            _ => Failure::about(prefix, &r.message),
        }
    }

    /// A sandbox call that gave no answer: its own line, escaped.
    pub fn sandbox(e: &RunError) -> Failure {
        Failure {
            sandbox: true,
            ..Failure::plain(sanitize::escape_text(&e.to_string()))
        }
    }
}

/// A sandbox that gave no answer ends the command with its own line.
impl From<RunError> for Failure {
    fn from(e: RunError) -> Failure {
        Failure::sandbox(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_sandbox_stops() {
        let r = |kind| Refusal {
            kind,
            message: "Image is not in qcow2 format".into(),
        };
        assert_eq!(
            Failure::refused("Could not open 'o': ", &r(ErrorKind::Open { dev: 0 })).text,
            "Could not open 'o': Image is not in qcow2 format"
        );
        assert_eq!(
            Failure::refused("Could not open 'o': ", &r(ErrorKind::Plain)).text,
            "Image is not in qcow2 format"
        );
        let stop = RunError::Internal("internal error in sandbox: a\nb".into());
        let stopped = Failure::sandbox(&stop);
        assert_eq!(stopped.text, "internal error in sandbox: a\\x0ab");
        // No further VM may run after a sandbox that gave no answer.
        assert!(stopped.sandbox);
        assert!(!Failure::plain("x").sandbox);
        assert!(Failure::change("b", "Invalid argument").at_change);
    }
}
