//! qcow2 overlays with persistent bitmaps (`docs/bitmaps.md`): QEMU's read-write open
//! loads them and marks them IN_USE, a safe rebase's writes dirty the enabled ones, and
//! the close stores them into new clusters. Here: which images are refused, the load
//! with QEMU's messages, the proof that the bitmap writes land only where they may, and
//! the `-u` rebase of an overlay whose bitmaps QEMU would store again.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use instar_abi::{GuestError, RebaseOutcome, RepairLines};
use instar_blockdev::BlockDev;
use instar_qcow2::bitmaps::{BitmapError, BitmapSet, Dirt};
use instar_qcow2::header::AUTOCLEAR_BITMAPS;
use instar_qcow2::overlap::{Layout, OverlapError};
use instar_qcow2::writer::{IoOp, ShadowDev, WriteError, Writer};
use instar_qcow2::Header;

use crate::probe::open_error;
use crate::unsafe_rebase::ForChange;
use crate::{plain, Hooks, OVERLAY};

/// Images whose bitmaps instar does not handle, refused before anything is written.
pub(crate) fn check_supported(header: &Header) -> Result<(), GuestError> {
    if header.dirty() && header.stale_bitmaps {
        return Err(open_error(
            OVERLAY,
            String::from(
                "instar does not rebase images with the dirty bit set whose bitmaps extension \
                 a program without bitmap support left behind (QEMU drops it and repairs the \
                 image on open); run 'qemu-img check -r all' on the image first",
            ),
        ));
    }
    if header.dirty() && header.bitmaps.is_some() {
        return Err(open_error(
            OVERLAY,
            String::from(
                "instar does not rebase images with persistent bitmaps and the dirty bit set \
                 (QEMU marks the bitmaps in use, then repairs the image on open); \
                 run 'qemu-img check -r all' on the image first",
            ),
        ));
    }
    Ok(())
}

/// The autoclear bitmaps bit without a bitmaps extension: QEMU's overlap check then
/// sees a bitmap directory of 0 bytes at offset 0, which its range test reads as
/// covering every offset, so every write of a safe rebase fails (and QEMU marks the
/// image corrupt). A plan with any write is refused before the first one.
pub(crate) fn check_phantom_directory(header: &Header, writes: bool) -> Result<(), GuestError> {
    if writes && header.autoclear_features & AUTOCLEAR_BITMAPS != 0 && header.bitmaps.is_none() {
        return Err(plain(
            "Preventing invalid write on metadata (overlaps with bitmap directory): the header \
             sets the bitmaps autoclear bit without a bitmaps extension, which QEMU's overlap \
             check reads as a directory over the whole file; nothing was written",
        ));
    }
    Ok(())
}

/// What QEMU's read-write open prints about the overlay's bitmaps: its warning for a
/// bitmaps extension without the autoclear bit (the rewritten header drops it).
pub(crate) fn open_lines(header: &Header) -> Vec<RepairLines> {
    if header.stale_bitmaps {
        alloc::vec![RepairLines::StaleBitmaps {
            v2: header.version < 3
        }]
    } else {
        Vec::new()
    }
}

/// QEMU's `qcow2_load_dirty_bitmaps` on the overlay, opened read-write: its errors
/// are open errors.
pub(crate) fn load(
    dev: &mut dyn BlockDev,
    header: &Header,
) -> Result<Option<BitmapSet>, GuestError> {
    let set = load_read_only(dev, header, OVERLAY)?;
    if let Some(s) = &set {
        s.check_in_place().map_err(|e| map_error(e, OVERLAY))?;
    }
    Ok(set)
}

/// The same load for an image of a backing chain (device `dev_index`), which QEMU opens
/// read-only: it checks and reads the bitmaps, and fails the open as for the overlay,
/// but never writes them.
pub(crate) fn load_read_only(
    dev: &mut dyn BlockDev,
    header: &Header,
    dev_index: u8,
) -> Result<Option<BitmapSet>, GuestError> {
    BitmapSet::load(dev, header).map_err(|e| map_error(e, dev_index))
}

fn map_error(e: BitmapError, dev_index: u8) -> GuestError {
    match e {
        BitmapError::Io(_) => open_error(dev_index, String::from("Input/output error")),
        e @ (BitmapError::TooLarge { .. } | BitmapError::Misplaced { .. }) => plain(e.to_string()),
        e => open_error(dev_index, e.to_string()),
    }
}

/// The guest byte ranges a safe rebase's requests write.
pub(crate) fn dirt(ops: &[crate::copy::Op]) -> Dirt {
    Dirt::from_requests(ops.iter().map(|op| match *op {
        crate::copy::Op::Data { offset, len } | crate::copy::Op::Zero { offset, len } => {
            (offset, len)
        }
    }))
}

pub(crate) fn overlap_error(e: OverlapError) -> GuestError {
    match e {
        OverlapError::Io(_) => plain(String::from("error while reading image metadata")),
        e => plain(e.to_string()),
    }
}

pub(crate) fn write_error(e: WriteError) -> GuestError {
    plain(alloc::format!("Error while writing to COW image: {e}"))
}

/// The dry run of the bitmaps' writes failed: the image's metadata contradicts itself
/// (a bitmap cluster with no refcount, a refcount table QEMU would have to grow past
/// its limits, …).
pub(crate) fn store_error(e: WriteError) -> GuestError {
    plain(alloc::format!(
        "the persistent bitmaps cannot be stored: {e}; nothing was written"
    ))
}

/// Where the last write of `log` ends.
pub(crate) fn log_end(log: &[IoOp]) -> u64 {
    log.iter()
        .map(|op| match *op {
            IoOp::Write { offset, len } | IoOp::ZeroRange { offset, len } => offset + len,
            IoOp::Flush => 0,
        })
        .max()
        .unwrap_or(0)
}

/// The host's own bound on a `-u` rebase's writes (`instar_vmm::write_cap`): bitmap
/// tables that say "all ones" without a cluster can ask for far more new clusters than
/// the file holds, and a write refused mid-way would leave the file changed.
fn unsafe_cap(len: u64) -> u64 {
    len.saturating_add(len / 32)
        .saturating_add(64 << 20)
        .max(2 << 20)
}

/// The host's bound on a safe rebase's writes, for an overlay of `len` bytes and
/// virtual size `size` (`instar_vmm::write_cap`).
fn safe_cap(len: u64, size: u64) -> u64 {
    let both = len.saturating_add(size);
    both.saturating_add(both / 8).saturating_add(64 << 20)
}

/// Refuse a store that would write past the host's bound (`cap`): only crafted bitmap
/// tables (all-ones entries without clusters, which QEMU never writes) get there, and a
/// write the host refused mid-way would leave the file changed.
pub(crate) fn check_cap(end: u64, len: u64, virtual_size: Option<u64>) -> Result<(), GuestError> {
    let cap = match virtual_size {
        Some(size) => safe_cap(len, size),
        None => unsafe_cap(len),
    };
    if end > cap {
        return Err(plain(alloc::format!(
            "storing the bitmaps would write up to {end:#x}, past the sandbox's bound for this \
             image ({cap:#x}); nothing was written"
        )));
    }
    Ok(())
}

/// `-u` on an overlay whose bitmaps QEMU stores again: prove the writes (a dry run
/// into memory, audited against every structure, bitmaps included), then the open's
/// in-place IN_USE update, the close's store with the new header, the caches.
pub(crate) fn unsafe_rebase(
    dev: &mut dyn BlockDev,
    opened: ForChange,
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    let ForChange {
        old,
        mut header,
        bitmaps,
        ..
    } = opened;
    let Some(set) = bitmaps else {
        return Err(plain("no bitmaps to store"));
    };
    let len = dev.size();
    let layout = Layout::scan_with_bitmaps(&mut *dev, &old, Some(&set)).map_err(overlap_error)?;
    let end = {
        let shadow = ShadowDev::new(&mut *dev);
        let lost = shadow.lost_flag();
        let run = || -> Result<(u64, instar_qcow2::writer::WriteRecord), WriteError> {
            let mut w = Writer::open_for_metadata(shadow, &old)?.recording(true);
            let mut h = header.clone();
            w.bitmaps_open(&set, &old)?;
            w.bitmaps_close(&set, &Dirt::default(), &mut h)?;
            let end = log_end(w.io_log());
            let (_, _, record) = w.finish_recorded()?;
            Ok((end, record))
        };
        let (end, record) = run().map_err(|e| {
            if lost.get() {
                plain("the rebase's writes could not be proved safe within the sandbox's memory")
            } else {
                store_error(e)
            }
        })?;
        layout.audit(&mut *dev, &record).map_err(overlap_error)?;
        end
    };
    check_cap(end, len, None)?;
    hooks.write_phase(end.max(len));
    let mut w = Writer::open_for_metadata(&mut *dev, &old).map_err(write_error)?;
    w.bitmaps_open(&set, &old).map_err(write_error)?;
    w.bitmaps_close(&set, &Dirt::default(), &mut header)
        .map_err(write_error)?;
    let end = log_end(w.io_log());
    w.finish().map_err(write_error)?;
    Ok(RebaseOutcome {
        stats: Default::default(),
        overlay_len: Some(len.max(end)),
        repair_lines: open_lines(&old),
    })
}
