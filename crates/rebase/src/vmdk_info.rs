//! What a probe reports about a vmdk image, read cheaply: version, capacity, grain
//! size, the parent named by `parentFileNameHint` (QEMU's `vmdk_parent_open`), and the
//! first extent file a descriptor names (QEMU's `vmdk_parse_extents` opens them all).

use alloc::vec;
use instar_abi::{Format, ImageInfo};
use instar_blockdev::bytes::{c_str, Fixed};
use instar_blockdev::BlockDev;
use instar_vmdk::descriptor::{
    extent_sectors, first_extent_file, line_number, parent_hint, DESC_OFFSET, DESC_SIZE,
    MAX_DESC_FILE,
};

/// Report a vmdk image. Nothing here is validated beyond what the report needs.
pub fn info(dev: &mut dyn BlockDev) -> Result<ImageInfo, instar_blockdev::IoError> {
    let mut head = [0u8; 512];
    dev.read_zero_padded(0, &mut head)?;
    let mut report = ImageInfo {
        format: Format::Vmdk,
        virtual_size: 0,
        cluster_size: 0,
        version: 0,
        backing_file: None,
        backing_format: None,
        data_file: None,
        extent_file: None,
    };
    let fixed = Fixed(&head);
    let desc = if &head[..4] == b"KDMV" {
        report.version = fixed.le32::<4>();
        let capacity = fixed.le64::<12>();
        report.virtual_size = capacity.saturating_mul(512);
        report.cluster_size = u32::try_from(fixed.le64::<20>().saturating_mul(512)).unwrap_or(0);
        // vmdk_open_vmdk4: a sparse header with no capacity and a descriptor offset is
        // opened as that descriptor, extents and all.
        let desc_offset = fixed.le64::<28>();
        if capacity == 0 && desc_offset != 0 {
            let len = dev.size().min(MAX_DESC_FILE) as usize;
            let mut embedded = vec![0u8; len];
            dev.read_zero_padded(desc_offset.saturating_mul(512), &mut embedded)?;
            report.extent_file = first_extent_file(c_str(&embedded));
        }
        let mut desc = vec![0u8; DESC_SIZE];
        dev.read_zero_padded(DESC_OFFSET, &mut desc)?;
        desc
    } else {
        let len = dev.size().next_multiple_of(512).min(MAX_DESC_FILE) as usize;
        let mut desc = vec![0u8; len];
        dev.read_zero_padded(0, &mut desc)?;
        desc
    };
    let text = c_str(&desc);
    if &head[..4] != b"KDMV" {
        report.version = line_number(text, b"version=")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0);
        report.virtual_size = extent_sectors(text).saturating_mul(512);
        // A text descriptor's data lives in its extent files (a COWD sparse file is its
        // own only extent).
        if &head[..4] != b"COWD" {
            report.extent_file = first_extent_file(text);
        }
    }
    if let Ok(Some(parent)) = parent_hint(text) {
        report.backing_file = Some(parent.to_vec());
        // vmdk_parent_open forces the parent's format.
        report.backing_format = Some(b"vmdk".to_vec());
    }
    Ok(report)
}
