//! Names that qemu-img accepts on its command line: block driver names (for `-f`/`-F`)
//! and cache modes (for `-t`/`-T`).

use instar_abi::Format;

/// Block drivers registered in the QEMU 10.2.2 reference build, as its `qemu-img --help`
/// lists them under "Supported image formats". `-F` accepts any of these (QEMU's
/// `bdrv_find_format`), protocols and filters included, and the name is recorded verbatim.
/// The lookup is case-sensitive, like QEMU's.
pub const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "host_cdrom",
    "host_device",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "replication",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Whether `name` is a block driver QEMU 10.2 knows.
pub fn is_qemu_driver(name: &str) -> bool {
    QEMU_DRIVERS.contains(&name)
}

/// What `-f`/`-F NAME` means for instar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverName {
    /// An image format the sandbox recognises.
    Format(Format),
    /// A QEMU driver instar cannot open (a protocol, a filter, or a format outside
    /// [`Format`]); fine to record as a backing format, impossible to open.
    QemuOnly,
    /// Not a QEMU driver at all.
    Unknown,
}

/// Classify a driver name given on the command line.
pub fn classify(name: &str) -> DriverName {
    if !is_qemu_driver(name) {
        return DriverName::Unknown;
    }
    match Format::from_name(name.as_bytes()) {
        Some(f) => DriverName::Format(f),
        None => DriverName::QemuOnly,
    }
}

/// Why instar cannot open an image with a driver. `Display` is the text after the
/// file's prefix: QEMU's for an unknown driver, instar's for a QEMU driver it does not
/// open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOpenable {
    #[error("Unknown driver '{0}'")]
    Unknown(String),
    #[error("Driver '{0}' is not supported by instar")]
    QemuOnly(String),
}

/// The format an image is opened as for the driver `name` (from `-f`, `-F` or an
/// image's recorded backing format); `shown` is the name as messages print it.
pub fn format_to_open(name: &[u8], shown: impl Into<String>) -> Result<Format, NotOpenable> {
    match std::str::from_utf8(name).map(classify) {
        Ok(DriverName::Format(f)) => Ok(f),
        Ok(DriverName::QemuOnly) => Err(NotOpenable::QemuOnly(shown.into())),
        _ => Err(NotOpenable::Unknown(shown.into())),
    }
}

/// Cache modes accepted by QEMU's `bdrv_parse_cache_mode` (`off` is an old alias of
/// `none`). instar validates them like qemu-img; the sandbox's I/O does not depend on them.
pub const CACHE_MODES: &[&str] = &[
    "none",
    "off",
    "directsync",
    "writeback",
    "unsafe",
    "writethrough",
];

/// Whether `mode` is a valid `-t`/`-T` value.
pub fn is_cache_mode(mode: &str) -> bool {
    CACHE_MODES.contains(&mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sandbox_format_is_a_qemu_driver() {
        for f in Format::ALL {
            assert_eq!(classify(f.name()), DriverName::Format(f), "{}", f.name());
        }
    }

    #[test]
    fn case_sensitive_and_protocols() {
        assert_eq!(classify("QCOW2"), DriverName::Unknown);
        assert_eq!(classify("host_device"), DriverName::QemuOnly);
        assert_eq!(classify("file"), DriverName::QemuOnly);
        assert_eq!(classify("foo"), DriverName::Unknown);
        assert_eq!(format_to_open(b"vmdk", "vmdk"), Ok(Format::Vmdk));
        assert_eq!(
            format_to_open(b"nbd", "nbd").unwrap_err().to_string(),
            "Driver 'nbd' is not supported by instar"
        );
        assert_eq!(
            format_to_open(b"\xff", "\\xff").unwrap_err().to_string(),
            "Unknown driver '\\xff'"
        );
        assert!(is_cache_mode("off"));
        assert!(!is_cache_mode("Writeback"));
    }
}
