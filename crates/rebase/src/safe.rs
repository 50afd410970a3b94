//! Safe-mode `qemu-img rebase` of a qcow2 overlay (device 0): copy every cluster whose
//! old-chain content differs from the new chain's, then rewrite the header.
//!
//! Order, so that nothing is written unless everything can succeed:
//! 1. open and validate the overlay and every chain image, check the new header fits;
//! 2. plan the copy ([`crate::copy::plan`]): reads and compares only, then prove the
//!    writes safe ([`prove_writes`]): replay the plan through the writer into memory and
//!    check every cluster it writes or takes against every structure of the overlay
//!    ([`instar_qcow2::overlap`]);
//! 3. `write_phase`, then replay the plan through the QEMU-identical
//!    [`instar_qcow2::writer::Writer`], finish it (L2 and refcount caches, flushes);
//! 4. rewrite cluster 0 (full cluster), flush.
//!
//! The header goes last, after the writer's final flush, so a stop at any point leaves
//! an image that still points at its old backing with content unchanged (QEMU itself
//! may write the header before its caches are flushed).

use alloc::format;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use instar_abi::{Format, GuestError, RebaseOutcome, RebaseRequest};
use instar_blockdev::{BlockDev, IoError};
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::overlap::{Layout, OverlapError};
use instar_qcow2::writer::{BackingRead, Finish, IoOp, ShadowDev, WriteError, WriteKind, Writer};
use instar_qcow2::Header;

use crate::chains::{
    check_request, copy_error, open_chains, plan_over, read_zero_padded, slots, stats, take,
    Chains, OldContent, Opened, Shared,
};
use crate::copy::{self, Content, CopyError, Geometry, Op, OverlayStatus, Sink};
use crate::probe::open_error;
use crate::unsafe_rebase::{change_error, map_change_error, open_for_change};
use crate::{plain, Hooks, IO_ERROR, OVERLAY};

pub(crate) fn rebase(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    if req.overlay_format != Format::Qcow2 {
        return Err(change_error("Operation not supported"));
    }
    let backing = req.new_backing.as_ref().filter(|b| !b.name.is_empty());
    let name = backing.map(|b| b.name.as_slice());
    let format = backing.and_then(|b| b.format.as_deref());
    check_request(req, backing.is_some(), req.in_chain)?;

    let mut slots = slots(devs);
    let overlay = take(&mut slots, OVERLAY)?;

    // 1. Everything that can fail before a write.
    let (mut header, _, crypt) = open_for_change(overlay, req, name, format)?;

    let Opened {
        mut old_view,
        mut new_view,
        old_len,
        new_from,
    } = open_chains(req, req.in_chain, &mut slots)?;

    let overlay_len = overlay.size();
    let old = RefCell::new(&mut old_view);

    // 2. Plan.
    let cluster_size = header.cluster_size();
    let plan = {
        let mut image = Qcow2Image::open(&mut *overlay, &header)
            .map_err(|e| open_error(OVERLAY, e.to_string()))?;
        let geom = Geometry {
            size: image.virtual_size(),
            write_align: image.subcluster_size(),
        };
        let chains = Chains {
            old: &old,
            old_len,
            new_from,
            new_view: &mut new_view,
        };
        plan_over(
            geom,
            &mut OverlayAlloc(&mut image),
            chains,
            req.progress,
            hooks,
        )?
    };

    // No write onto metadata: proved before the first write.
    let has_backing = old_len > 0 || header.version < 3;
    let proved_end = prove_writes(&mut *overlay, &header, &plan.ops, has_backing)?;

    // 3. Write. The dry run knows exactly where the writes end (a refcount block that
    // claims clusters past the end of the file pushes allocations further out than
    // the plan's size alone suggests); the estimate is kept as a floor.
    hooks.write_phase(
        crate::write_end::plan_end(overlay_len, cluster_size, &plan.ops)
            .max(proved_end)
            .max(cluster_size),
    );
    // QEMU opens the overlay with its old backing; v2 write-zeroes then fall back to
    // writing zero data. A v2 overlay without a backing file would lose content in
    // QEMU (its zero write becomes a no-op discard): instar writes zero data there too.
    let old_content = (old_len > 0).then_some(OldContent(&old));
    let (written_end, finish) = if old_len > 0 || header.version < 3 {
        let writer = Writer::open_with_backing(&mut *overlay, &header, CowBacking(&old))
            .map(|w| w.with_crypt(crypt));
        write_plan(writer, &plan.ops, old_content)?
    } else {
        write_plan(
            Writer::open(&mut *overlay, &header, false).map(|w| w.with_crypt(crypt)),
            &plan.ops,
            old_content,
        )?
    };

    // 4. The header, last.
    header.incompatible_features = finish.incompatible_features;
    header.refcount_table_offset = finish.refcount_table_offset;
    header.refcount_table_clusters = finish.refcount_table_clusters;
    let cluster = header
        .rebuild()
        .map_err(|e| map_change_error(e, format.is_some()))?;
    overlay
        .write_at(0, &cluster)
        .map_err(|_| change_error(IO_ERROR))?;
    overlay.flush().map_err(|_| change_error(IO_ERROR))?;

    Ok(RebaseOutcome {
        stats: stats(&plan.ops, cluster_size),
        overlay_len: Some(overlay_len.max(written_end).max(cluster.len() as u64)),
        repair_lines: alloc::vec::Vec::new(),
    })
}

/// Prove that the plan's writes land only where they may: find every structure of the
/// overlay, replay the plan through the writer into memory (guest data left out, so
/// nothing is read from the old chain and nothing reaches the device), and audit every
/// cluster the writer wrote or took, plus the final header rewrite. Returns where the
/// last of those writes ends.
fn prove_writes(
    overlay: &mut dyn BlockDev,
    header: &Header,
    ops: &[Op],
    has_backing: bool,
) -> Result<u64, GuestError> {
    let layout = Layout::scan(&mut *overlay, header).map_err(overlap_error)?;
    let shadow = ShadowDev::new(&mut *overlay);
    let lost = shadow.lost_flag();
    // A dry run that needed metadata the shadow did not keep proves nothing.
    let unproved = |e: GuestError| {
        if lost.get() {
            plain(String::from(
                "the rebase's writes could not be proved safe within the sandbox's memory",
            ))
        } else {
            e
        }
    };
    let mut writer = Writer::open(shadow, header, has_backing)
        .map_err(write_error)?
        .recording(true);
    copy::execute(ops, None, &mut WriterSink(&mut writer))
        .map_err(copy_error)
        .map_err(unproved)?;
    let (_, _, mut record) = writer
        .finish_recorded()
        .map_err(write_error)
        .map_err(unproved)?;
    record.add_write(0, header.cluster_size(), WriteKind::Header);
    layout.audit(overlay, &record).map_err(overlap_error)?;
    Ok(record
        .writes
        .iter()
        .map(|w| w.offset.saturating_add(w.len))
        .max()
        .unwrap_or(0))
}

fn overlap_error(e: OverlapError) -> GuestError {
    match e {
        OverlapError::Io(_) => plain(String::from("error while reading image metadata")),
        e => plain(e.to_string()),
    }
}

/// Replay the plan through `writer` and finish it; returns where the last write ended.
fn write_plan<D: BlockDev, B: BackingRead>(
    writer: Result<Writer<D, B>, WriteError>,
    ops: &[Op],
    mut old: Option<OldContent<'_, '_>>,
) -> Result<(u64, Finish), GuestError> {
    let mut writer = writer.map_err(write_error)?;
    copy::execute(
        ops,
        old.as_mut().map(|c| c as &mut dyn Content),
        &mut WriterSink(&mut writer),
    )
    .map_err(copy_error)?;
    let written_end = writer
        .io_log()
        .iter()
        .map(|op| match *op {
            IoOp::Write { offset, len } | IoOp::ZeroRange { offset, len } => offset + len,
            IoOp::Flush => 0,
        })
        .max()
        .unwrap_or(0);
    let (_, finish) = writer.finish().map_err(write_error)?;
    Ok((written_end, finish))
}

fn write_error(e: WriteError) -> GuestError {
    plain(format!("Error while writing to COW image: {e}"))
}

struct OverlayAlloc<'r, D: BlockDev>(&'r mut Qcow2Image<D>);

impl<D: BlockDev> OverlayStatus for OverlayAlloc<'_, D> {
    fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError> {
        self.0
            .is_allocated(offset, bytes)
            .map_err(|e| CopyError::Metadata(e.to_string()))
    }
}

/// Copy-on-write source for the writer: the overlay's old backing, zeros past its end.
struct CowBacking<'r, 'a>(Shared<'r, 'a>);

impl BackingRead for CowBacking<'_, '_> {
    fn read_backing(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_zero_padded(self.0, guest_offset, buf)
    }
}

struct WriterSink<'w, D: BlockDev, B: BackingRead>(&'w mut Writer<D, B>);

impl<D: BlockDev, B: BackingRead> Sink for WriterSink<'_, D, B> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.0
            .write(offset, data)
            .map_err(|e| CopyError::Write(e.to_string()))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.0
            .write_zeroes(offset, len)
            .map_err(|e| CopyError::Write(e.to_string()))
    }
}
