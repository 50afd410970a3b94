//! Format detection, in the spirit of QEMU's `bdrv_probe_all`: every driver scores the
//! first 512 bytes of the image (zero-padded), the highest score wins, and raw (score 1)
//! is the fallback. An empty file is raw without probing.
//!
//! [`check_format`] is the other half: the first checks a driver makes when an image is
//! opened with an explicit format (`-f`, `-F`, or a recorded backing format), with the
//! driver's message. qcow2 is checked fully by `instar_qcow2::Header::read`.

use alloc::vec;
use instar_abi::Format;
use instar_blockdev::bytes::{c_str, Fixed};
use instar_blockdev::BlockDev;
use instar_vmdk::descriptor::{quoted_value, MAX_DESC_FILE};

/// QEMU's `BLOCK_PROBE_BUF_SIZE`.
pub const PROBE_BUF_SIZE: usize = 512;

/// Why an image cannot be opened as the requested format. The text is QEMU's message
/// (after `Could not open '<file>': `), except where noted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("Could not read image for determining its format: Input/output error")]
    ReadFailed,
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    #[error("File is too small, not a valid image")]
    VmdkTooSmall,
    #[error("invalid VMDK image descriptor")]
    VmdkDescriptor,
    #[error("Image not in QED format")]
    NotQed,
    #[error("Image not in VDI format (bad signature {0:08x})")]
    NotVdi(u32),
    #[error("File too small for a VHD header")]
    VpcTooSmall,
    #[error("invalid VPC image")]
    NotVpc,
    /// QEMU's own text here names the file (`Could not open '<file>': Invalid argument`),
    /// which the guest does not know.
    #[error("Invalid argument")]
    NotVhdx,
    #[error("Image not in qcow format")]
    NotQcow,
    #[error("Parameter 'key-secret' is required for cipher")]
    LuksSecretRequired,
    #[error("Image not in Parallels format")]
    NotParallels,
    #[error("Image is read-only")]
    ReadOnlyDriver,
    #[error("dmg file must be at least 512 bytes long")]
    DmgTooSmall,
    #[error("Could not locate UDIF trailer in dmg file")]
    NotDmg,
    #[error("Image not in Bochs format")]
    NotBochs,
    #[error("block_size {0} must be a multiple of 512")]
    CloopBlockSizeAlign(u32),
    #[error("block_size cannot be zero")]
    CloopBlockSizeZero,
    #[error("block_size {0} must be 64 MB or less")]
    CloopBlockSizeLarge(u32),
}

fn read(dev: &mut dyn BlockDev, offset: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
    dev.read_zero_padded(offset, buf)
        .map_err(|_| ProbeError::ReadFailed)
}

/// `"QFI\xfb"`, shared by qcow (version 1) and qcow2 (version 2 and up).
const QCOW_MAGIC: u32 = 0x5146_49fb;

/// A C-string field of `field_len` bytes at `at` equals `s` (QEMU's `strcmp` on a field).
fn c_field_is(buf: &[u8], at: usize, s: &str) -> bool {
    let s = s.as_bytes();
    buf.get(at..at + s.len()) == Some(s) && buf.get(at + s.len()) == Some(&0)
}

/// The score each driver gives the probe buffer (QEMU's `bdrv_probe` callbacks).
/// `dmg` scores by file name only, which the guest does not see, so it never wins here.
pub fn score(format: Format, buf: &[u8; PROBE_BUF_SIZE]) -> u32 {
    match format {
        Format::Raw => 1,
        Format::Qcow2 => {
            if Fixed(buf).be32::<0>() == QCOW_MAGIC && Fixed(buf).be32::<4>() >= 2 {
                100
            } else {
                0
            }
        }
        Format::Qcow => {
            if Fixed(buf).be32::<0>() == QCOW_MAGIC && Fixed(buf).be32::<4>() == 1 {
                100
            } else {
                0
            }
        }
        Format::Vmdk => vmdk_score(buf),
        Format::Qed => u32::from(Fixed(buf).le32::<0>() == 0x0044_4551) * 100,
        Format::Vdi => u32::from(Fixed(buf).le32::<0x40>() == 0xbeda_107f) * 100,
        Format::Vpc => u32::from(&buf[..8] == b"conectix") * 100,
        Format::Vhdx => u32::from(&buf[..8] == b"vhdxfile") * 100,
        Format::Luks => u32::from(&buf[..6] == b"LUKS\xba\xbe" && buf[6..8] == [0, 1]) * 100,
        Format::Parallels => {
            let magic = &buf[..16];
            u32::from(
                (magic == b"WithoutFreeSpace" || magic == b"WithouFreSpacExt")
                    && Fixed(buf).le32::<16>() == 2,
            ) * 100
        }
        Format::Dmg => 0,
        Format::Bochs => {
            let version = Fixed(buf).le32::<64>();
            u32::from(
                c_field_is(buf, 0, "Bochs Virtual HD Image")
                    && c_field_is(buf, 32, "Redolog")
                    && c_field_is(buf, 48, "Growing")
                    && (version == 0x0002_0000 || version == 0x0001_0000),
            ) * 100
        }
        Format::Cloop => {
            const MAGIC: &[u8] =
                b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
            u32::from(buf.starts_with(MAGIC)) * 2
        }
    }
}

/// `vmdk_probe`: the sparse magics, or a text descriptor whose first non-comment,
/// non-blank line is `version=1|2|3`.
fn vmdk_score(buf: &[u8; PROBE_BUF_SIZE]) -> u32 {
    let magic = Fixed(buf).be32::<0>();
    if magic == 0x434f_5744 || magic == 0x4b44_4d56 {
        return 100; // "COWD", "KDMV"
    }
    let end = buf.len();
    let mut p = 0;
    while p < end {
        match buf[p] {
            b'#' => {
                while p < end && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < end && buf[p] == b' ' {
                    p += 1;
                }
                if p < end && buf[p] == b'\r' {
                    p += 1;
                }
                if p == end || buf[p] != b'\n' {
                    return 0;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                for v in [b"version=1\n", b"version=2\n", b"version=3\n"] {
                    if rest.starts_with(v) {
                        return 100;
                    }
                }
                for v in [b"version=1\r\n", b"version=2\r\n", b"version=3\r\n"] {
                    if rest.starts_with(v) {
                        return 100;
                    }
                }
                return 0;
            }
        }
    }
    0
}

/// The order drivers are asked in; on equal scores the earlier one wins. No two
/// drivers accept the same bytes, so the order only matters for raw's fallback.
const PROBE_ORDER: [Format; 13] = [
    Format::Vmdk,
    Format::Vpc,
    Format::Vhdx,
    Format::Vdi,
    Format::Raw,
    Format::Qed,
    Format::Qcow2,
    Format::Qcow,
    Format::Parallels,
    Format::Luks,
    Format::Dmg,
    Format::Cloop,
    Format::Bochs,
];

/// The format QEMU would pick for the image on `dev` when none is given.
pub fn probe(dev: &mut dyn BlockDev) -> Result<Format, ProbeError> {
    if dev.size() == 0 {
        return Ok(Format::Raw);
    }
    let mut buf = [0u8; PROBE_BUF_SIZE];
    read(dev, 0, &mut buf)?;
    let mut best = (Format::Raw, 0);
    for f in PROBE_ORDER {
        let s = score(f, &buf);
        if s > best.1 {
            best = (f, s);
        }
    }
    Ok(best.0)
}

/// The first checks QEMU's driver for `format` makes when opening `dev` explicitly
/// as that format (all of them for formats instar does not read; qcow2 is left to the
/// qcow2 crate). `writable` is a read-write open.
pub fn check_format(
    dev: &mut dyn BlockDev,
    format: Format,
    writable: bool,
) -> Result<(), ProbeError> {
    let size = dev.size();
    let mut buf = [0u8; PROBE_BUF_SIZE];
    read(dev, 0, &mut buf)?;
    // The read-only drivers refuse a read-write open before they look at the image.
    if writable && matches!(format, Format::Dmg | Format::Bochs | Format::Cloop) {
        return Err(ProbeError::ReadOnlyDriver);
    }
    match format {
        Format::Raw => Ok(()),
        Format::Qcow2 => {
            if Fixed(&buf).be32::<0>() == QCOW_MAGIC {
                Ok(())
            } else {
                Err(ProbeError::NotQcow2)
            }
        }
        Format::Vmdk => check_vmdk(dev, &buf),
        Format::Qed => ok_if(score(format, &buf) > 0, ProbeError::NotQed),
        Format::Vdi => ok_if(
            score(format, &buf) > 0,
            ProbeError::NotVdi(Fixed(&buf).le32::<0x40>()),
        ),
        Format::Vpc => {
            if score(format, &buf) > 0 {
                return Ok(());
            }
            // A fixed VHD only has its footer at the end of the file.
            if size < 512 {
                return Err(ProbeError::VpcTooSmall);
            }
            let mut footer = [0u8; 512];
            read(dev, size.next_multiple_of(512) - 512, &mut footer)?;
            ok_if(
                &footer[..8] == b"conectix" && Fixed(&footer).be32::<60>() == 2,
                ProbeError::NotVpc,
            )
        }
        Format::Vhdx => ok_if(score(format, &buf) > 0, ProbeError::NotVhdx),
        Format::Qcow => ok_if(score(format, &buf) > 0, ProbeError::NotQcow),
        // No secret is ever given, and LUKS asks for it before reading anything.
        Format::Luks => Err(ProbeError::LuksSecretRequired),
        Format::Parallels => ok_if(score(format, &buf) > 0, ProbeError::NotParallels),
        Format::Dmg => {
            // bdrv_getlength() rounds up to whole sectors.
            let len = size.next_multiple_of(512);
            if len < 512 {
                return Err(ProbeError::DmgTooSmall);
            }
            let offset = len.saturating_sub(511 + 512);
            let n = len.min(515) as usize;
            let mut tail = [0u8; 515];
            read(dev, offset, &mut tail[..n])?;
            ok_if(
                tail[..n].windows(4).any(|w| w == b"koly"),
                ProbeError::NotDmg,
            )
        }
        Format::Bochs => ok_if(score(format, &buf) > 0, ProbeError::NotBochs),
        Format::Cloop => {
            let block_size = Fixed(&buf).be32::<128>();
            if !block_size.is_multiple_of(512) {
                Err(ProbeError::CloopBlockSizeAlign(block_size))
            } else if block_size == 0 {
                Err(ProbeError::CloopBlockSizeZero)
            } else if block_size > 64 << 20 {
                Err(ProbeError::CloopBlockSizeLarge(block_size))
            } else {
                Ok(())
            }
        }
    }
}

fn ok_if(ok: bool, err: ProbeError) -> Result<(), ProbeError> {
    if ok {
        Ok(())
    } else {
        Err(err)
    }
}

/// `vmdk_open`: a sparse header, or a text descriptor with a `createType`.
fn check_vmdk(dev: &mut dyn BlockDev, head: &[u8; PROBE_BUF_SIZE]) -> Result<(), ProbeError> {
    let size = dev.size();
    if size == 0 {
        return Err(ProbeError::VmdkTooSmall);
    }
    let magic = Fixed(head).be32::<0>();
    if magic == 0x434f_5744 || magic == 0x4b44_4d56 {
        return Ok(());
    }
    // QEMU reads the descriptor up to 1 MiB - 1 (the file length rounded up to 512).
    let len = size.next_multiple_of(512).min(MAX_DESC_FILE) as usize;
    let mut desc = vec![0u8; len];
    read(dev, 0, &mut desc)?;
    let found = quoted_value(c_str(&desc), b"createType").is_some();
    ok_if(found, ProbeError::VmdkDescriptor)
}
