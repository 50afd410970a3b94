//! The one escaping rule for text that came from an image or the guest.
//!
//! Such text is attacker-controlled. Before it reaches a terminal, a log or an error
//! message it is cut to a bound and every byte outside printable ASCII is shown as
//! `\xNN`, so no escape sequence, newline or carriage return gets through and no line
//! of output can be forged. Printable ASCII is kept, so ordinary names read exactly as
//! QEMU prints them. The host's sandbox (vmm) and command line (cli) both use this.

use alloc::string::String;
use core::fmt::Write as _;

/// `bytes` with printable ASCII kept and everything else as `\xNN`; at most `max` input
/// bytes are shown, and `...` marks a cut. Idempotent on its own output (which is all
/// printable ASCII), so text escaped once is not escaped twice.
pub fn escape_bytes(bytes: &[u8], max: usize) -> String {
    let shown = &bytes[..bytes.len().min(max)];
    let mut out = String::with_capacity(shown.len());
    for &b in shown {
        match b {
            0x20..=0x7e => out.push(b as char),
            // Writing to a String cannot fail.
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if bytes.len() > max {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_non_ascii_are_escaped_and_idempotent() {
        assert_eq!(escape_bytes(b"ok: 'x'", 64), "ok: 'x'");
        assert_eq!(escape_bytes(b"a\nb\r\x1b[2J", 64), "a\\x0ab\\x0d\\x1b[2J");
        assert_eq!(escape_bytes("é\\".as_bytes(), 64), "\\xc3\\xa9\\");
        let once = escape_bytes(b"a\nb\x07", 64);
        assert_eq!(escape_bytes(once.as_bytes(), 64), once);
        assert_eq!(escape_bytes(b"\xff\x00\x7f", 8), "\\xff\\x00\\x7f");
    }

    #[test]
    fn bounded() {
        let s = escape_bytes(&[b'x'; 5000], 1024);
        assert_eq!(s.len(), 1024 + 3);
        assert!(s.ends_with("..."));
    }
}
