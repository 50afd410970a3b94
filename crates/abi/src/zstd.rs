//! Which zstd library the guest compresses `-c` clusters of zstd images with.
//!
//! zstd's output changes between releases, and qemu-img compresses with the system's
//! libzstd, so the guest carries the releases of the Debian versions qemu-img is
//! compared with and the host picks one (`INSTAR_ZSTD`, `docs/compression.md`).

use serde::{Deserialize, Serialize};

/// A zstd release built into the guest.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZstdVersion {
    /// zstd 1.5.7: Debian 13's, linked by qemu-img 11.1 there. The default.
    #[default]
    V1_5_7,
    /// zstd 1.5.4: Debian 12's, linked by qemu-img 10.x there.
    V1_5_4,
}

impl ZstdVersion {
    /// Every release the guest carries, the default first.
    pub const ALL: [ZstdVersion; 2] = [ZstdVersion::V1_5_7, ZstdVersion::V1_5_4];

    /// The release as `ZSTD_versionString()` gives it.
    pub const fn name(self) -> &'static str {
        match self {
            ZstdVersion::V1_5_7 => "1.5.7",
            ZstdVersion::V1_5_4 => "1.5.4",
        }
    }

    /// The release named `name` exactly ("1.5.4"), if the guest carries it.
    pub fn from_name(name: &str) -> Option<ZstdVersion> {
        ZstdVersion::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// A short version string (up to 8 bytes, like "1.5.7" or "1.2.13") packed into the
/// `u64` of a self-test answer: its bytes in little-endian order, zero-padded.
pub fn pack_version(s: &[u8]) -> Option<u64> {
    let mut b = [0u8; 8];
    b.get_mut(..s.len())?.copy_from_slice(s);
    Some(u64::from_le_bytes(b))
}

/// The string [`pack_version`] packed.
pub fn unpack_version(v: u64) -> alloc::string::String {
    let b = v.to_le_bytes();
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    alloc::string::String::from_utf8_lossy(&b[..n]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_default_is_1_5_7() {
        for v in ZstdVersion::ALL {
            assert_eq!(ZstdVersion::from_name(v.name()), Some(v));
        }
        assert_eq!(ZstdVersion::default(), ZstdVersion::V1_5_7);
        assert_eq!(ZstdVersion::from_name("1.5.5"), None);
        assert_eq!(ZstdVersion::from_name(" 1.5.4"), None);
        assert_eq!(ZstdVersion::from_name(""), None);
    }

    #[test]
    fn version_strings_pack() {
        for s in ["1.5.7", "1.2.13", "", "12345678"] {
            assert_eq!(unpack_version(pack_version(s.as_bytes()).unwrap()), s);
        }
        assert_eq!(pack_version(b"123456789"), None);
    }
}
