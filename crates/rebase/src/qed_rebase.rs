//! Rebase of a qed overlay (device 0), unsafe and safe, byte-identical to qemu-img:
//!
//! - the header rewrite is `bdrv_qed_co_change_backing_file`'s: the 64-byte header
//!   with `QED_F_BACKING_FILE` (and `QED_F_BACKING_FORMAT_NO_PROBE` for a raw new
//!   backing) and the name right after it, in one write; what followed the old name
//!   stays. A header and name longer than `header_size` clusters is QEMU's `ENOSPC`;
//!   unknown compat features refuse a new name (`ENOTSUP`). Unknown autoclear bits
//!   are cleared, as QEMU's read-write open does;
//! - safe mode runs qemu-img's copy loop ([`crate::copy`]) into
//!   [`instar_qed::Writer`], which allocates as QEMU's qed driver does, then writes
//!   the header last with `QED_F_NEED_CHECK` clear (QEMU's close clears it).
//!
//! An image with `QED_F_NEED_CHECK` set gets QEMU's open-time repair
//! ([`instar_qed::check`]), planned before and written after `write_phase`. Everything
//! that can fail is checked before `write_phase`.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use instar_abi::{Format, GuestError, RebaseOutcome, RebaseRequest};
use instar_blockdev::BlockDev;
use instar_chain::probe::check_format;
use instar_qed::check::Repair;
use instar_qed::header::F_NEED_CHECK;
use instar_qed::{Below, ChangeError, Header, QedImage, Writer};

use crate::chains::{
    check_request, copy_error, open_chains, plan_over, slots, stats, take, Chains, CowSink,
    CowWriter, OldBelow, OldContent, Opened,
};
use crate::copy::{self, Content, CopyError, Geometry, Op, OverlayStatus};
use crate::probe::open_error;
use crate::unsafe_rebase::change_error;
use crate::{device, plain, Hooks, IO_ERROR, OVERLAY};

fn map_change(e: ChangeError) -> GuestError {
    change_error(&e.to_string())
}

/// Open the overlay as QEMU's read-write open does: autoclear bits cleared, and the
/// repair of an image with `QED_F_NEED_CHECK` planned (applied in memory; its writes
/// are made by [`apply_repair`]).
fn open_overlay<D: BlockDev>(mut dev: D) -> Result<(QedImage<D>, Repair), GuestError> {
    check_format(&mut dev, Format::Qed, true).map_err(|e| open_error(OVERLAY, e.to_string()))?;
    let mut img = QedImage::open(dev).map_err(|e| open_error(OVERLAY, e.to_string()))?;
    img.clear_autoclear();
    let repair = if img.header().need_check() {
        img.repair()
            .map_err(|e| open_error(OVERLAY, e.to_string()))?
    } else {
        Repair::default()
    };
    // A table the repair rewrites must not be anything else too.
    let cs = img.cluster_size();
    let mut touched = BTreeSet::new();
    for (offset, bytes) in &repair.writes {
        let mut c = *offset & !(cs - 1);
        while c < offset + bytes.len() as u64 {
            touched.insert(c);
            c += cs;
        }
    }
    img.check_overlaps(&touched)
        .map_err(|e| plain(e.to_string()))?;
    Ok((img, repair))
}

/// The repair's writes, then the header marked clean, as QEMU's open makes them.
fn apply_repair<D: BlockDev>(img: &mut QedImage<D>, repair: &Repair) -> Result<(), GuestError> {
    let header = *img.header();
    let dev = img.dev_mut();
    let io = |_| open_error(OVERLAY, String::from("Image corrupted"));
    for (offset, bytes) in &repair.writes {
        dev.write_at(*offset, bytes).map_err(io)?;
    }
    if repair.marked_clean {
        dev.flush().map_err(io)?;
        dev.write_at(0, &header.to_bytes()).map_err(io)?;
    }
    Ok(())
}

pub(crate) fn rebase(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    // `-b ""` detaches like no `-b` at all.
    let backing = req.new_backing.as_ref().filter(|b| !b.name.is_empty());
    let name = backing.map(|b| b.name.as_slice());
    let format = backing.and_then(|b| b.format.as_deref());
    check_request(req, backing.is_some(), req.in_chain)?;
    if !req.unsafe_mode {
        return safe(req, devs, hooks, name, format);
    }

    let (mut img, repair) = open_overlay(device(devs, OVERLAY)?)?;
    if name.is_some() && format.is_none() {
        return Err(change_error("backing format must be specified"));
    }
    let (_, bytes) = final_header(img.header())
        .change_backing(name, format)
        .map_err(map_change)?;
    // The repair rewrites tables in place; the header is the only write that may pass
    // the file's end.
    let len = img.dev_mut().size();
    hooks.write_phase(crate::write_end::header_end(len, bytes.len() as u64));
    apply_repair(&mut img, &repair)?;
    let dev = img.dev_mut();
    dev.write_at(0, &bytes)
        .map_err(|_| change_error(IO_ERROR))?;
    dev.flush().map_err(|_| change_error(IO_ERROR))?;
    Ok(RebaseOutcome::default())
}

/// The header as QEMU's close leaves it: no need-check bit.
fn final_header(h: &Header) -> Header {
    let mut h = *h;
    h.features &= !F_NEED_CHECK;
    h
}

/// Whether QEMU opens a backing file below this image (a C string; empty is none).
fn names_backing<D: BlockDev>(img: &QedImage<D>) -> bool {
    img.header().has_backing() && img.backing_name().is_some_and(|n| n.first() != Some(&0))
}

fn safe(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
    name: Option<&[u8]>,
    format: Option<&[u8]>,
) -> Result<RebaseOutcome, GuestError> {
    let mut slots = slots(devs);
    let overlay = take(&mut slots, OVERLAY)?;
    let overlay_len = overlay.size();
    let (mut image, repair) = open_overlay(overlay)?;
    // The old chain must be the one the header names: copying against nothing would
    // replace the backing file's data with zeros.
    if names_backing(&image) == req.old_chain.is_empty() {
        return Err(plain(String::from(
            "the old chain does not match the overlay's backing file",
        )));
    }
    // The header must fit before anything is copied (qemu-img fails only afterwards).
    if name.is_some() && format.is_none() {
        return Err(change_error("backing format must be specified"));
    }
    final_header(image.header())
        .change_backing(name, format)
        .map_err(map_change)?;

    let Opened {
        mut old_view,
        mut new_view,
        old_len,
        new_from,
    } = open_chains(req, req.in_chain, &mut slots)?;
    let old = RefCell::new(&mut old_view);

    let geom = Geometry {
        size: image.virtual_size(),
        write_align: image.cluster_size(),
        whole_unallocated: false,
    };
    let chains = Chains {
        old: &old,
        old_len,
        new_from,
        new_view: &mut new_view,
    };
    let plan = plan_over(
        geom,
        &mut ClusterAlloc(&mut image),
        chains,
        req.progress,
        hooks,
    )?;

    // Every request must find valid tables, and write through no shared cluster,
    // before the first write.
    let mut touched = BTreeSet::new();
    for op in &plan.ops {
        let (Op::Data { offset, len } | Op::Zero { offset, len }) = *op;
        image
            .touched(offset, len, &mut touched)
            .map_err(|e| plain(format!("Error while writing to COW image: {e}")))?;
    }
    image
        .check_overlaps(&touched)
        .map_err(|e| plain(e.to_string()))?;
    // A new L2 table takes `table_size` clusters: counting in units of one table bounds
    // both the data clusters and the tables an op can allocate.
    let unit = image
        .cluster_size()
        .saturating_mul(u64::from(image.header().table_size));
    let len = image.dev_mut().size();
    let end = crate::write_end::plan_end(len, unit, &plan.ops).max(unit);
    let mut writer = Writer::new(image, old_len > 0);

    hooks.write_phase(end);
    writer.with_image(|img| apply_repair(img, &repair))?;
    {
        let mut old_content = (old_len > 0).then_some(OldContent(&old));
        let mut sink = CowSink {
            writer: &mut writer,
            below: (old_len > 0).then_some(OldBelow(&old)),
        };
        copy::execute(
            &plan.ops,
            old_content.as_mut().map(|c| c as &mut dyn Content),
            &mut sink,
        )
        .map_err(copy_error)?;
    }
    let written_end = writer.written_end();
    let mut image = writer.finish();
    // The header, last, after a flush: it names the new backing file (and clears
    // `QED_F_NEED_CHECK`), which is only right once every copied cluster and its L2
    // entry are on the disk. (QEMU's header write has no flush before it.)
    let (_, bytes) = final_header(image.header())
        .change_backing(name, format)
        .map_err(map_change)?;
    let overlay = image.dev_mut();
    overlay.flush().map_err(|_| change_error(IO_ERROR))?;
    overlay
        .write_at(0, &bytes)
        .map_err(|_| change_error(IO_ERROR))?;
    overlay.flush().map_err(|_| change_error(IO_ERROR))?;
    let repaired_end = repair
        .writes
        .iter()
        .map(|(o, b)| o + b.len() as u64)
        .max()
        .unwrap_or(0);

    Ok(RebaseOutcome {
        stats: stats(&plan.ops, geom.write_align),
        overlay_len: Some(
            overlay_len
                .max(written_end)
                .max(repaired_end)
                .max(bytes.len() as u64),
        ),
        repair_lines: alloc::vec::Vec::new(),
    })
}

/// `bdrv_is_allocated` on the overlay: one `qed_find_cluster` answer, zero clusters
/// allocated.
struct ClusterAlloc<'r, D: BlockDev>(&'r mut QedImage<D>);

impl<D: BlockDev> OverlayStatus for ClusterAlloc<'_, D> {
    fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError> {
        let (state, n) = self
            .0
            .find_cluster(offset, bytes)
            .map_err(|e| CopyError::Metadata(e.to_string()))?;
        let allocated = matches!(
            state,
            instar_qed::ClusterState::Found(_) | instar_qed::ClusterState::Zero
        );
        Ok((allocated, n))
    }
}

impl<D: BlockDev> CowWriter for Writer<D> {
    fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        below: Option<&mut dyn Below>,
    ) -> Result<(), String> {
        Writer::write(self, offset, data, below).map_err(|e| e.to_string())
    }
    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        below: Option<&mut dyn Below>,
    ) -> Result<(), String> {
        Writer::write_zeroes(self, offset, len, below).map_err(|e| e.to_string())
    }
}
