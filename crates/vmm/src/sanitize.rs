//! Making guest text safe for a terminal.

use instar_abi::MAX_MESSAGE;

/// Replace every byte that is not printable ASCII (or a space) with `?`, cut to
/// [`MAX_MESSAGE`] bytes. Guest text is hostile: escape sequences, newlines and invalid
/// UTF-8 never reach the terminal.
pub fn sanitize(bytes: &[u8]) -> String {
    let mut out: String = bytes
        .iter()
        .take(MAX_MESSAGE)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if bytes.len() > MAX_MESSAGE {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_and_utf8_are_replaced() {
        assert_eq!(sanitize(b"ok \x1b[31mred\n"), "ok ?[31mred?");
        assert_eq!(sanitize("é".as_bytes()), "??");
    }

    #[test]
    fn long_text_is_cut() {
        let s = sanitize(&[b'a'; 5000]);
        assert_eq!(s.len(), MAX_MESSAGE + 3);
        assert!(s.ends_with("..."));
    }
}
