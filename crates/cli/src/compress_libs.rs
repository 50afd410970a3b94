//! `INSTAR_ZSTD`: which zstd release the guest compresses zstd clusters with (`-c`).
//!
//! qemu-img compresses with the system's libzstd, and zstd's output changes between
//! releases: qemu-img 11.1 on Debian 13 links zstd 1.5.7 (the default here), qemu-img
//! on Debian 12 links 1.5.4. zlib needs no such choice: Debian 12's 1.2.13 and Debian
//! 13's 1.3.1 deflate to the same bytes (`docs/compression.md`).

use std::ffi::OsStr;

use instar_abi::ZstdVersion;

use crate::sanitize;

/// The environment variable.
pub const ZSTD_ENV: &str = "INSTAR_ZSTD";

/// The release `value` (the variable's value, `None` when unset) selects, or the
/// message for a value that names no release the guest carries.
pub fn zstd_from(value: Option<&OsStr>) -> Result<ZstdVersion, String> {
    let Some(value) = value else {
        return Ok(ZstdVersion::default());
    };
    value
        .to_str()
        .and_then(ZstdVersion::from_name)
        .ok_or_else(|| {
            format!(
                "Invalid {ZSTD_ENV} value '{}': expected 1.5.7 (the default, as qemu-img on \
                 Debian 13) or 1.5.4 (as qemu-img on Debian 12)",
                sanitize::escape_text(&value.to_string_lossy())
            )
        })
}

/// [`zstd_from`] the process's environment.
pub fn zstd_from_env() -> Result<ZstdVersion, String> {
    zstd_from(std::env::var_os(ZSTD_ENV).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_is_1_5_7_and_both_releases_are_named() {
        assert_eq!(zstd_from(None), Ok(ZstdVersion::V1_5_7));
        assert_eq!(zstd_from(Some("1.5.7".as_ref())), Ok(ZstdVersion::V1_5_7));
        assert_eq!(zstd_from(Some("1.5.4".as_ref())), Ok(ZstdVersion::V1_5_4));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in ["", "1.5.5", "1.5", "1.5.4 ", "debian12", "1.5.4\n"] {
            let e = zstd_from(Some(bad.as_ref())).unwrap_err();
            assert!(e.starts_with("Invalid INSTAR_ZSTD value '"), "{bad:?}: {e}");
        }
    }
}
