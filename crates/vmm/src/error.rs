//! Errors of the sandbox. Each `Display` is one line, fit to follow `instar: `.

use std::io;
use std::time::Duration;

/// Why a sandbox run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {reason} ({hint})")]
    KvmUnavailable {
        /// The system's description of the error, e.g. "Permission denied".
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The caller asked for something the sandbox cannot do (bad RAM size, too many
    /// devices, a request that does not fit the request area, a bad guest image).
    #[error("cannot start the sandbox: {0}")]
    Config(String),
    /// A host-side KVM or memory operation failed while setting the VM up.
    #[error("cannot start the sandbox: {what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    /// The guest panicked; the message is sanitised.
    #[error("internal error in sandbox: {0}")]
    GuestPanic(String),
    /// The guest stopped in a way it should not (triple fault, bad MMIO access, unexpected
    /// VM exit, malformed response); the text is sanitised and names the guest's RIP where
    /// known.
    #[error("internal error in sandbox: {0}")]
    GuestFault(String),
    /// The watchdog ended a guest that made no progress.
    #[error("internal error in sandbox: the guest made no progress for {0:?}")]
    Watchdog(Duration),
    /// The run's total deadline passed ([`crate::Config::deadline`]).
    #[error(
        "internal error in sandbox: the guest did not finish within its deadline of {} s",
        .0.as_secs_f64()
    )]
    Deadline(Duration),
    /// Fault injection ([`crate::Config::stop_after_writes`]): the guest was stopped
    /// right after this many writes reached the device files.
    #[error("sandbox stopped after {0} writes (fault injection)")]
    StoppedAfterWrites(u64),
    /// `KVM_RUN` itself failed.
    #[error("internal error in sandbox: KVM_RUN failed: {0}")]
    Run(io::Error),
}

impl Error {
    pub(crate) fn setup(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Setup { what, source }
    }

    pub(crate) fn kvm_open(source: io::Error) -> Error {
        let hint = match source.kind() {
            io::ErrorKind::PermissionDenied => "add your user to the 'kvm' group",
            io::ErrorKind::NotFound => {
                "KVM is not available: enable virtualisation and load the kvm module"
            }
            _ => "check that KVM is available and usable by this user",
        };
        // io::Error's Display ends in " (os error N)", noise in a one-line message.
        let text = source.to_string();
        let reason = match text.find(" (os error") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        Error::KvmUnavailable { reason, hint }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_errors_are_one_clear_line() {
        let e = Error::kvm_open(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            e.to_string(),
            "cannot open /dev/kvm: Permission denied (add your user to the 'kvm' group)"
        );
        let e = Error::kvm_open(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            e.to_string(),
            "cannot open /dev/kvm: No such file or directory (KVM is not available: enable \
             virtualisation and load the kvm module)"
        );
    }
}
