//! Making guest text safe for a terminal.

use instar_abi::MAX_MESSAGE;

/// Guest text with every byte that is not printable ASCII shown as `\xNN`, cut to
/// [`MAX_MESSAGE`] bytes: the one escaping rule of [`instar_abi::escape`], which the
/// command line applies to names as well. Guest text is hostile: escape sequences,
/// newlines and invalid UTF-8 never reach the terminal.
pub fn sanitize(bytes: &[u8]) -> String {
    instar_abi::escape::escape_bytes(bytes, MAX_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_and_utf8_are_escaped() {
        assert_eq!(sanitize(b"ok \x1b[31mred\n"), "ok \\x1b[31mred\\x0a");
        assert_eq!(sanitize("é".as_bytes()), "\\xc3\\xa9");
    }

    #[test]
    fn long_text_is_cut() {
        let s = sanitize(&[b'a'; 5000]);
        assert_eq!(s.len(), MAX_MESSAGE + 3);
        assert!(s.ends_with("..."));
    }
}
