//! Making image- and guest-supplied text safe to print or to put into JSON.
//!
//! Everything the sandbox returns, and every name or format read from an image, is
//! attacker-controlled (a crafted image can make the guest say anything and can name any
//! file). Before such text reaches a terminal it is cut to a bound and every byte outside
//! printable ASCII is shown as `\xNN`, so no escape sequence, newline or carriage return
//! can reach the terminal or forge another line of output. Printable ASCII is kept as it
//! is, so QEMU's messages about ordinary names read exactly as QEMU's.
//!
//! This module is the only place that does it: names go through [`name`], guest text
//! through [`escape_text`] or [`escape_bytes`]. Names the user typed (FILE, `-b`, `-F`)
//! are printed as typed, as qemu-img prints them.

/// Longest guest text instar prints (longer text is cut and marked with `...`).
pub const MAX_SHOWN: usize = 1024;

/// `bytes` with printable ASCII kept and everything else as `\xNN`, at most `max` input
/// bytes shown: the one rule, shared with the sandbox ([`instar_abi::escape`]).
pub use instar_abi::escape::escape_bytes;

/// A name from an image (backing file, data file, extent, format) as it may be shown:
/// [`escape_bytes`] bounded by [`MAX_SHOWN`].
pub fn name(bytes: &[u8]) -> String {
    escape_bytes(bytes, MAX_SHOWN)
}

/// [`escape_bytes`] for text, bounded by [`MAX_SHOWN`].
pub fn escape_text(text: &str) -> String {
    escape_bytes(text.as_bytes(), MAX_SHOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_non_ascii_are_escaped() {
        assert_eq!(escape_text("ok: 'x'"), "ok: 'x'");
        assert_eq!(escape_text("a\nb\r\x1b[2J"), "a\\x0ab\\x0d\\x1b[2J");
        assert_eq!(escape_text("é\\"), "\\xc3\\xa9\\");
        let once = escape_text("a\nb");
        assert_eq!(escape_text(&once), once);
        assert_eq!(escape_bytes(b"\xff\x00", 8), "\\xff\\x00");
    }

    #[test]
    fn bounded() {
        let long = "x".repeat(5000);
        let s = escape_text(&long);
        assert_eq!(s.len(), MAX_SHOWN + 3);
        assert!(s.ends_with("..."));
    }
}
