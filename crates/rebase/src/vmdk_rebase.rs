//! Rebase of a monolithicSparse vmdk overlay (device 0). qemu-img refuses every vmdk
//! rebase (the driver has no `change_backing_file`); instar does it the way the
//! format allows:
//!
//! - the parent lives in the text descriptor at byte 512: `parentFileNameHint="<-b>"`
//!   and `parentCID=<the new parent's CID>`, because QEMU refuses reads through an
//!   overlay whose `parentCID` is not its parent's `CID`; detaching removes the hint
//!   and sets `parentCID=ffffffff`. The parent's format is always vmdk (QEMU forces
//!   it), so `-F` may only say `vmdk`;
//! - safe mode first copies, through [`instar_vmdk::SparseWriter`], every grain whose
//!   old-chain content differs from the new chain's (qemu-img's loop with the grain
//!   as write alignment), then rewrites the descriptor last.
//!
//! The overlay's own `CID` is kept in both modes. QEMU gives an image a new random
//! CID on its first write in a session, to tell images below a child that they
//! changed; a rebase does not change what the overlay shows, and keeping the CID
//! keeps any image stacked on this overlay (whose `parentCID` is this CID) readable.
//!
//! Everything is validated before `write_phase`: the overlay (monolithicSparse,
//! writable version, descriptor area), the new descriptor (fits, name representable,
//! reads back as intended), the new parent (a vmdk, its CID), both chains, the plan,
//! and room for every grain the plan writes.

use alloc::format;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use instar_abi::{Format, GuestError, RebaseOutcome, RebaseRequest};
use instar_blockdev::BlockDev;
use instar_chain::probe::check_format;
use instar_vmdk::writer::{check_clear_of_descriptor, check_rewritable, write_descriptor};
use instar_vmdk::{Below, GrainKind, RewriteError, SparseWriter, VmdkImage, WriteError};

use crate::chains::{
    check_request, copy_error, open_chains, plan_over, slots, stats, take, Chains, CowSink,
    CowWriter, OldBelow, OldContent, Opened,
};
use crate::copy::{self, Content, CopyError, Geometry, Op, OverlayStatus};
use crate::probe::open_error;
use crate::unsafe_rebase::change_error;
use crate::{device, plain, Hooks, IO_ERROR, OVERLAY};

/// The `CID` of the vmdk on `dev` (opened and validated like any chain image).
fn read_cid(devs: &mut [&mut dyn BlockDev], dev: u8) -> Result<u32, GuestError> {
    let d = device(devs, dev)?;
    let img = VmdkImage::open(d).map_err(|e| open_error(dev, e.to_string()))?;
    Ok(img.descriptor().cid)
}

/// `vmdk_create`'s rule for a parent: a vmdk, whatever `-F` or the probe said.
fn require_vmdk(format: Format) -> Result<(), GuestError> {
    if format == Format::Vmdk {
        Ok(())
    } else {
        Err(change_error(&format!(
            "Invalid backing file format: {}. Must be vmdk",
            format.name()
        )))
    }
}

fn rewrite_error(e: RewriteError) -> GuestError {
    match e {
        RewriteError::Invalid(d) => open_error(OVERLAY, format!("invalid VMDK descriptor: {d}")),
        other => change_error(&other.to_string()),
    }
}

fn vmdk_write_error(e: WriteError) -> GuestError {
    match e {
        WriteError::Vmdk(v) => open_error(OVERLAY, v.to_string()),
        WriteError::StreamOptimized
        | WriteError::Version3
        | WriteError::DescriptorArea { .. }
        | WriteError::OverDescriptor { .. }
        | WriteError::GrainTooLarge(_) => open_error(OVERLAY, e.to_string()),
        WriteError::Overlap(o) => plain(o.to_string()),
        other => plain(format!("Error while writing to COW image: {other}")),
    }
}

pub(crate) fn rebase(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    // The overlay first, as qemu-img opens it before looking at the new backing.
    let descriptor = {
        let dev = device(devs, OVERLAY)?;
        check_format(dev, Format::Vmdk, true).map_err(|e| open_error(OVERLAY, e.to_string()))?;
        let mut img = VmdkImage::open(dev).map_err(|e| open_error(OVERLAY, e.to_string()))?;
        check_rewritable(img.header(), img.is_compressed()).map_err(vmdk_write_error)?;
        check_clear_of_descriptor(&mut img).map_err(vmdk_write_error)?;
        img.descriptor().clone()
    };
    let parent_cid = descriptor.parent_cid;
    // The old chain must be the one the descriptor names: copying against nothing
    // would replace the parent's data with zeros.
    if !req.unsafe_mode && descriptor.parent_file_name_hint.is_some() == req.old_chain.is_empty() {
        return Err(plain(String::from(
            "the old chain does not match the overlay's parentFileNameHint",
        )));
    }

    // `-b ""` detaches like no `-b` at all.
    let backing = req.new_backing.as_ref().filter(|b| !b.name.is_empty());
    if let Some(f) = backing.and_then(|b| b.format.as_deref()) {
        if f != b"vmdk" {
            return Err(change_error("backing_file must be a vmdk image"));
        }
    }
    let in_chain = if req.unsafe_mode { None } else { req.in_chain };
    check_request(req, backing.is_some(), in_chain)?;

    // The new parent: its CID goes into parentCID.
    let parent = match backing {
        None => None,
        Some(b) => {
            let image = match in_chain {
                Some(i) => req
                    .old_chain
                    .get(usize::from(i))
                    .ok_or_else(|| plain(format!("in-chain index {i} outside the old chain")))?,
                None => req.new_chain.first().ok_or_else(|| {
                    plain(String::from(
                        "the new backing file of a vmdk overlay must be attached: \
                         its CID goes into the overlay's parentCID",
                    ))
                })?,
            };
            require_vmdk(image.format)?;
            Some((b.name.as_slice(), read_cid(devs, image.dev)?))
        }
    };

    // The new descriptor.
    let block = descriptor.with_parent(parent).map_err(rewrite_error)?;

    if req.unsafe_mode {
        let dev = device(devs, OVERLAY)?;
        hooks.write_phase(descriptor_end(dev.size(), &block));
        write_descriptor(dev, &block).map_err(|_| change_error(IO_ERROR))?;
        return Ok(RebaseOutcome::default());
    }
    safe(req, devs, hooks, &block, parent_cid, in_chain)
}

fn safe(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
    block: &[u8],
    overlay_parent_cid: u32,
    in_chain: Option<u8>,
) -> Result<RebaseOutcome, GuestError> {
    // QEMU refuses reads (and copy-on-write) through an overlay whose parentCID is
    // not its parent's CID; a vmdk's parent is always opened as vmdk.
    if let Some(first) = req.old_chain.first() {
        if first.format != Format::Vmdk {
            return Err(open_error(
                first.dev,
                String::from("Image not in VMDK format (a vmdk parent is always a vmdk)"),
            ));
        }
        let cid = read_cid(devs, first.dev)?;
        if cid != overlay_parent_cid {
            return Err(plain(format!(
                "error while reading from old backing file: the overlay's parentCID \
                 {overlay_parent_cid:08x} is not its backing file's CID {cid:08x}"
            )));
        }
    }

    let mut slots = slots(devs);
    let overlay = take(&mut slots, OVERLAY)?;
    let Opened {
        mut old_view,
        mut new_view,
        old_len,
        new_from,
    } = open_chains(req, in_chain, &mut slots)?;
    let overlay_len = overlay.size();
    let old = RefCell::new(&mut old_view);

    // Plan: reads and compares only.
    let (plan, grain) = {
        let mut image =
            VmdkImage::open(&mut *overlay).map_err(|e| open_error(OVERLAY, e.to_string()))?;
        let geom = Geometry {
            size: image.virtual_size(),
            write_align: image.grain_size(),
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
            &mut GrainAlloc(&mut image),
            chains,
            req.progress,
            hooks,
        )?;
        (plan, geom.write_align)
    };

    // Every write must be possible before the first one.
    let mut writer = SparseWriter::open(&mut *overlay).map_err(vmdk_write_error)?;
    for op in &plan.ops {
        let (offset, len, zero) = match *op {
            Op::Data { offset, len } => (offset, len, false),
            Op::Zero { offset, len } => (offset, len, true),
        };
        writer.check(offset, len, zero).map_err(vmdk_write_error)?;
    }

    hooks.write_phase(
        crate::write_end::plan_end(overlay_len, grain, &plan.ops)
            .max(descriptor_end(overlay_len, block)),
    );
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
    let (overlay, written_end) = writer.finish().map_err(vmdk_write_error)?;

    // The descriptor, last: until then the overlay still names its old parent, and
    // the grains copied so far show what that parent showed.
    write_descriptor(overlay, block).map_err(|_| change_error(IO_ERROR))?;

    Ok(RebaseOutcome {
        stats: stats(&plan.ops, grain),
        overlay_len: Some(overlay_len.max(written_end)),
        repair_lines: alloc::vec::Vec::new(),
    })
}

/// `bdrv_is_allocated` on the overlay: zeroed grains count as allocated. Runs of
/// grains with the same status are merged (one grain per answer would be slow).
struct GrainAlloc<'r, D: BlockDev>(&'r mut VmdkImage<D>);

impl<D: BlockDev> OverlayStatus for GrainAlloc<'_, D> {
    fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError> {
        let meta = |e: instar_vmdk::VmdkError| CopyError::Metadata(e.to_string());
        let first = self.0.block_status(offset, bytes).map_err(meta)?;
        let allocated = first.kind != GrainKind::Unallocated;
        let mut run = first.bytes;
        while run > 0 && run < bytes {
            let st = self
                .0
                .block_status(offset + run, bytes - run)
                .map_err(meta)?;
            if st.bytes == 0 || (st.kind != GrainKind::Unallocated) != allocated {
                break;
            }
            run += st.bytes;
        }
        Ok((allocated, run))
    }
}

impl<D: BlockDev> CowWriter for SparseWriter<D> {
    fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        below: Option<&mut dyn Below>,
    ) -> Result<(), String> {
        SparseWriter::write(self, offset, data, below).map_err(|e| e.to_string())
    }
    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        below: Option<&mut dyn Below>,
    ) -> Result<(), String> {
        SparseWriter::write_zeroes(self, offset, len, below).map_err(|e| e.to_string())
    }
}

/// The end of a descriptor rewrite (`write_descriptor` writes `block` at
/// `DESC_OFFSET`) on an overlay of `len` bytes.
fn descriptor_end(len: u64, block: &[u8]) -> u64 {
    let end = instar_vmdk::descriptor::DESC_OFFSET.saturating_add(block.len() as u64);
    crate::write_end::header_end(len, end)
}
