//! `Request::Probe`: identify an image and validate it as QEMU's open would.

use alloc::string::ToString;
use instar_abi::{ErrorKind, Format, GuestError, ImageInfo, ProbeRequest};
use instar_blockdev::BlockDev;
use instar_chain::probe::{check_format, probe as probe_format};
use instar_qcow2::{Header, OpenMode};
use instar_qed::QedImage;

use crate::{device, other_formats, vmdk_info, IO_ERROR};

/// What QEMU's open of a qcow2 image reports, with its checks.
pub(crate) fn qcow2_info(
    dev: &mut dyn BlockDev,
    mode: OpenMode,
    index: u8,
) -> Result<(Header, ImageInfo), GuestError> {
    let header = Header::read(dev, mode).map_err(|e| open_error(index, e.to_string()))?;
    let info = info_of(&header);
    Ok((header, info))
}

/// What a probe reports of an opened qcow2 image.
pub(crate) fn info_of(header: &Header) -> ImageInfo {
    ImageInfo {
        format: Format::Qcow2,
        virtual_size: header.virtual_size(),
        cluster_size: header.cluster_size() as u32,
        version: header.version,
        // QEMU treats an empty name as no backing file.
        backing_file: header.backing_file.clone().filter(|n| !n.is_empty()),
        backing_format: header.backing_format.clone().filter(|n| !n.is_empty()),
        data_file: header.data_file.clone().filter(|_| header.has_data_file()),
        extent_file: None,
    }
}

pub(crate) fn open_error(dev: u8, message: alloc::string::String) -> GuestError {
    GuestError {
        kind: ErrorKind::Open { dev },
        message,
    }
}

pub(crate) fn probe(
    req: &ProbeRequest,
    devs: &mut [&mut dyn BlockDev],
) -> Result<ImageInfo, GuestError> {
    let dev = device(devs, req.dev)?;
    let mode = if req.writable {
        OpenMode::ReadWrite
    } else {
        OpenMode::ReadOnly
    };
    let format = match req.format {
        Some(Format::Qcow2) => Format::Qcow2,
        Some(f) => {
            check_format(dev, f, req.writable).map_err(|e| open_error(req.dev, e.to_string()))?;
            f
        }
        None => probe_format(dev).map_err(|e| open_error(req.dev, e.to_string()))?,
    };
    match format {
        Format::Qcow2 => {
            crate::keyed_open::qcow2_probe(dev, mode, req.dev, req.key.as_ref(), req.derive_key)
        }
        Format::Raw => Ok(ImageInfo {
            format,
            // QEMU sizes a raw image in whole sectors.
            virtual_size: dev.size().next_multiple_of(512),
            cluster_size: 0,
            version: 0,
            backing_file: None,
            backing_format: None,
            data_file: None,
            extent_file: None,
        }),
        Format::Vmdk => vmdk_info::info(dev).map_err(|_| open_error(req.dev, IO_ERROR.into())),
        Format::Qed => qed_info(dev, req.dev),
        // Recognised so that the host can refuse it by name, with the backing file it
        // names (qcow) so that the host knows what a probed format would let in.
        _ => Ok(ImageInfo {
            format,
            virtual_size: 0,
            cluster_size: 0,
            version: 0,
            backing_file: other_formats::backing_name(dev, format)
                .map_err(|_| open_error(req.dev, IO_ERROR.into()))?,
            backing_format: None,
            data_file: None,
            extent_file: None,
        }),
    }
}

/// What QEMU's open of a qed image reports, with its checks. A raw backing file
/// (`QED_F_BACKING_FORMAT_NO_PROBE`) is reported as format `raw`.
pub(crate) fn qed_info(dev: &mut dyn BlockDev, index: u8) -> Result<ImageInfo, GuestError> {
    let img = QedImage::open(dev).map_err(|e| open_error(index, e.to_string()))?;
    let header = *img.header();
    Ok(ImageInfo {
        format: Format::Qed,
        virtual_size: img.virtual_size(),
        cluster_size: header.cluster_size,
        version: 0,
        backing_file: img.backing_name().map(<[u8]>::to_vec),
        backing_format: (header.has_backing() && header.backing_is_raw()).then(|| b"raw".to_vec()),
        data_file: None,
        extent_file: None,
    })
}
