//! Calls into the sandbox, and checks of what comes back.
//!
//! The flow talks to a [`Guest`] so that it can be exercised without KVM; the real one
//! runs one micro-VM per call. A call ends one of three ways: an answer, a refusal (the
//! guest's [`Response::Error`], which the command reports with QEMU's words), or a
//! [`RunError`] (the sandbox gave no answer), which ends the command at once.

use instar_abi::{
    Call, Format, GuestError, ImageInfo, ProbeRequest, RebaseOutcome, Request, Response,
    MAX_MESSAGE, MAX_REPORTED_NAME,
};

use crate::files::ImageFile;
pub use crate::sandbox::Device;
use crate::sanitize;

/// Something that runs one call in a fresh sandbox.
pub trait Guest {
    /// Run `call` with `devices` attached (index = device number). `on_progress` receives
    /// the guest's progress reports. A refusal is an `Ok` [`Response::Error`].
    fn run(
        &mut self,
        call: &Call,
        devices: &[Device<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Response, RunError>;
}

/// Why a sandbox call ended without an answer. Each `Display` is the sandbox's one line
/// to print after "instar: "; it may contain guest text, which must be escaped before
/// it is printed (the command's failures do it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The sandbox could not start (no KVM, a bad configuration, a failed setup).
    #[error("{0}")]
    Unavailable(String),
    /// The watchdog stopped a guest that made no progress.
    #[error("{0}")]
    Watchdog(String),
    /// The run's total deadline passed.
    #[error("{0}")]
    Deadline(String),
    /// The guest or the VMM failed (a guest panic or fault, `KVM_RUN` failing, an answer
    /// that breaks the protocol, test-only fault injection).
    #[error("{0}")]
    Internal(String),
}

impl From<instar_vmm::Error> for RunError {
    fn from(e: instar_vmm::Error) -> RunError {
        use instar_vmm::Error as E;
        let text = e.to_string();
        match e {
            E::KvmUnavailable { .. } | E::Config(_) | E::Setup { .. } => {
                RunError::Unavailable(text)
            }
            E::Watchdog(_) => RunError::Watchdog(text),
            E::Deadline(_) => RunError::Deadline(text),
            E::GuestPanic(_) | E::GuestFault(_) | E::StoppedAfterWrites(_) | E::Run(_) => {
                RunError::Internal(text)
            }
        }
    }
}

/// A guest answer that breaks the protocol (wrong variant, impossible values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("internal error: the sandbox returned {0}")]
pub struct Unexpected(pub &'static str);

impl From<Unexpected> for RunError {
    fn from(e: Unexpected) -> RunError {
        RunError::Internal(e.to_string())
    }
}

/// What a call produced once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    /// The guest refused, with its (sanitised) message.
    Refused(Refusal),
}

/// A guest error, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: instar_abi::ErrorKind,
    /// Escaped and bounded.
    pub message: String,
}

fn refusal(e: &GuestError) -> Refusal {
    Refusal {
        kind: e.kind,
        message: sanitize::escape_bytes(e.message.as_bytes(), MAX_MESSAGE),
    }
}

fn name_ok(name: &Option<Vec<u8>>) -> bool {
    name.as_ref().is_none_or(|n| n.len() <= MAX_REPORTED_NAME)
}

/// Check a probe answer: the right variant, names within bounds, and the format that was
/// asked for (when one was).
pub fn probe_answer(
    response: Response,
    wanted: Option<instar_abi::Format>,
) -> Result<Answer<ImageInfo>, Unexpected> {
    match response {
        Response::Probe(info) => {
            if wanted.is_some_and(|f| f != info.format) {
                return Err(Unexpected("a probe of another format than requested"));
            }
            if !name_ok(&info.backing_file)
                || !name_ok(&info.backing_format)
                || !name_ok(&info.data_file)
                || !name_ok(&info.extent_file)
            {
                return Err(Unexpected("an over-long name"));
            }
            Ok(Answer::Ok(info))
        }
        Response::Error(e) => Ok(Answer::Refused(refusal(&e))),
        _ => Err(Unexpected("an answer of the wrong kind to a probe")),
    }
}

/// Probe one opened file in its own VM, attached read-only (even the overlay: a probe
/// never writes); `writable` validates it as a read-write open would.
pub fn probe(
    guest: &mut dyn Guest,
    image: &ImageFile,
    format: Option<Format>,
    writable: bool,
) -> Result<Answer<ImageInfo>, RunError> {
    probe_keyed(guest, image, format, writable, None, true)
}

/// [`probe`] with the image's `encrypt.` options (for device 0): an encrypted image
/// is opened as QEMU opens it with them, its key unlocked in the guest (derived only
/// when `derive_key`; every other check of the open runs either way).
pub fn probe_keyed(
    guest: &mut dyn Guest,
    image: &ImageFile,
    format: Option<Format>,
    writable: bool,
    key: Option<instar_abi::ImageKey>,
    derive_key: bool,
) -> Result<Answer<ImageInfo>, RunError> {
    let call = Call {
        device_sizes: vec![image.len],
        request: Request::Probe(ProbeRequest {
            dev: 0,
            format,
            writable,
            key,
            derive_key,
        }),
    };
    let devices = [Device {
        file: &image.file,
        writable: false,
    }];
    let response = guest.run(&call, &devices, &mut |_| {})?;
    Ok(probe_answer(response, format)?)
}

/// Run one rebase call and check its answer.
pub fn rebase(
    guest: &mut dyn Guest,
    call: &Call,
    devices: &[Device<'_>],
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<Answer<RebaseOutcome>, RunError> {
    let response = guest.run(call, devices, on_progress)?;
    Ok(rebase_answer(response)?)
}

/// Check a rebase answer.
pub fn rebase_answer(response: Response) -> Result<Answer<RebaseOutcome>, Unexpected> {
    match response {
        Response::Rebase(outcome) => Ok(Answer::Ok(outcome)),
        Response::Error(e) => Ok(Answer::Refused(refusal(&e))),
        _ => Err(Unexpected("an answer of the wrong kind to a rebase")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instar_abi::{ErrorKind, Format};

    fn info(format: Format) -> ImageInfo {
        ImageInfo {
            format,
            virtual_size: 1 << 20,
            cluster_size: 65536,
            version: 3,
            backing_file: None,
            backing_format: None,
            data_file: None,
            extent_file: None,
        }
    }

    #[test]
    fn probe_checks() {
        assert_eq!(
            probe_answer(Response::Probe(info(Format::Raw)), Some(Format::Qcow2)),
            Err(Unexpected("a probe of another format than requested"))
        );
        let mut long = info(Format::Qcow2);
        long.backing_file = Some(vec![b'a'; MAX_REPORTED_NAME + 1]);
        assert!(probe_answer(Response::Probe(long), None).is_err());
        assert!(probe_answer(Response::SelfTest(1), None).is_err());
    }

    #[test]
    fn sandbox_stops_keep_their_kind_and_line() {
        use std::time::Duration;
        let e = RunError::from(instar_vmm::Error::Watchdog(Duration::from_secs(2)));
        assert_eq!(
            e,
            RunError::Watchdog(
                "internal error in sandbox: the guest made no progress for 2s".into()
            )
        );
        let e = RunError::from(instar_vmm::Error::Deadline(Duration::from_secs(1)));
        assert!(matches!(e, RunError::Deadline(_)), "{e:?}");
        let e = RunError::from(instar_vmm::Error::Config("too many devices".into()));
        assert!(matches!(e, RunError::Unavailable(_)), "{e:?}");
        let e = RunError::from(instar_vmm::Error::GuestPanic("boom".into()));
        assert_eq!(e.to_string(), "internal error in sandbox: boom");
        assert_eq!(
            RunError::from(Unexpected("an over-long name")),
            RunError::Internal("internal error: the sandbox returned an over-long name".into())
        );
    }

    #[test]
    fn guest_messages_are_escaped_and_bounded() {
        let e = GuestError {
            kind: ErrorKind::Plain,
            message: format!("bad\n\x1b]0;x{}", "y".repeat(3000)),
        };
        let Answer::Refused(r) = rebase_answer(Response::Error(e)).unwrap() else {
            panic!("expected a refusal")
        };
        assert!(r.message.starts_with("bad\\x0a\\x1b]0;x"));
        assert!(r.message.len() <= MAX_MESSAGE * 4 + 6);
        assert!(r.message.ends_with("..."));
        assert!(!r.message.contains('\n'));
    }
}
