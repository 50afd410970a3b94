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

use alloc::string::{String, ToString};
use core::cell::RefCell;

use instar_abi::{Format, GuestError, RebaseOutcome, RebaseRequest};
use instar_blockdev::{BlockDev, IoError};
use instar_qcow2::bitmaps::{BitmapSet, Dirt};
use instar_qcow2::compressor::Compressor;
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::overlap::Layout;
use instar_qcow2::writer::{Below, Finish, ShadowDev, WriteError, WriteKind, Writer};
use instar_qcow2::Header;

use crate::bitmap_rebase::{self, overlap_error, store_error, write_error};
use crate::chains::{
    check_request, copy_error, open_chains, plan_over, read_zero_padded, slots, stats, take,
    Chains, OldContent, Opened, Shared,
};
use crate::compress_cache::{Kept, Recorder, Replayer};
use crate::copy::{self, Content, CopyError, Geometry, Op, OverlayStatus, Sink};
use crate::probe::open_error;
use crate::unsafe_rebase::{change_error, map_change_error, open_for_change, ForChange};
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
    let ForChange {
        old: opened_header,
        mut header,
        bitmaps,
        crypt,
        ..
    } = open_for_change(overlay, req, name, format)?;

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
        // qemu-img -c widens every request to whole clusters: a compressed write
        // covers a whole cluster (its subclusters cannot be written one by one).
        let geom = Geometry {
            size: image.virtual_size(),
            write_align: if req.compress {
                image.cluster_size()
            } else {
                image.subcluster_size()
            },
            whole_unallocated: req.compress,
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

    compressed_writes_possible(req, &header, &plan.ops)?;
    // No write onto metadata: proved before the first write. Compressed writes are
    // proved with the real data: where each one lands depends on how well the clusters
    // before it compressed.
    bitmap_rebase::check_phantom_directory(&header, !plan.ops.is_empty())?;
    let has_backing = old_len > 0 || header.version < 3;
    let dirt = bitmap_rebase::dirt(&plan.ops);
    let stored = stored_bitmaps(bitmaps.as_ref(), &opened_header, &dirt);
    let proof_content = (req.compress && old_len > 0).then_some(OldContent(&old));
    // The dry run's compressed clusters are kept for the real run (compress_cache).
    let mut kept = Kept::default();
    let proved_end = {
        let mut recorder = compressor_of(req, hooks)?.map(|c| Recorder::new(c, &mut kept));
        prove_writes(
            &mut *overlay,
            &header,
            &plan.ops,
            has_backing,
            (bitmaps.as_ref(), stored),
            proof_content,
            recorder.as_mut().map(|r| r as &mut dyn Compressor),
        )?
    };
    if bitmaps.as_ref().is_some_and(BitmapSet::needs_store) {
        bitmap_rebase::check_cap(proved_end, overlay_len, Some(header.virtual_size()))?;
    }

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
    let stored = stored_bitmaps(bitmaps.as_ref(), &opened_header, &dirt);
    let mut replayer = compressor_of(req, hooks)?.map(|c| Replayer::new(c, kept));
    let compressor = replayer.as_mut().map(|r| r as &mut dyn Compressor);
    let (written_end, finish) = if old_len > 0 || header.version < 3 {
        let writer = Writer::open_with_backing(&mut *overlay, &header, CowBacking(&old))
            .map(|w| w.with_crypt(crypt));
        write_plan(
            writer,
            &plan.ops,
            (old_content, compressor),
            stored,
            &mut header,
        )?
    } else {
        write_plan(
            Writer::open(&mut *overlay, &header, false).map(|w| w.with_crypt(crypt)),
            &plan.ops,
            (old_content, compressor),
            stored,
            &mut header,
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
        repair_lines: bitmap_rebase::open_lines(&opened_header),
    })
}

/// QEMU writes no compressed cluster into an external data file: the first compressed
/// write fails (`-ENOTSUP`). Refused here, before anything is written.
fn compressed_writes_possible(
    req: &RebaseRequest,
    header: &Header,
    ops: &[Op],
) -> Result<(), GuestError> {
    let data_file = header.data_file.is_some() || header.has_data_file();
    if req.compress && data_file && ops.iter().any(|op| matches!(op, Op::Data { .. })) {
        return Err(plain(String::from(
            "Error while writing to COW image: Operation not supported",
        )));
    }
    Ok(())
}

/// The guest's compressor when the request asks for `-c`; an error when it asks and
/// the runtime has none.
fn compressor_of<'h>(
    req: &RebaseRequest,
    hooks: &'h mut dyn Hooks,
) -> Result<Option<&'h mut dyn Compressor>, GuestError> {
    if !req.compress {
        return Ok(None);
    }
    match hooks.compressor() {
        Some(c) => Ok(Some(c)),
        None => Err(plain(String::from(
            "this guest cannot write compressed clusters",
        ))),
    }
}

/// Prove that the plan's writes land only where they may: find every structure of the
/// overlay, replay the plan through the writer into memory (guest data left out, so
/// nothing is read from the old chain and nothing reaches the device), and audit every
/// cluster the writer wrote or took, plus the final header rewrite. Returns where the
/// last of those writes ends.
///
/// A compressed rebase (`compressor` given) reads and compresses the real data
/// (`old`): the compressed sizes decide the layout. It still writes nothing.
fn prove_writes(
    overlay: &mut dyn BlockDev,
    header: &Header,
    ops: &[Op],
    has_backing: bool,
    (bitmaps, stored): (Option<&BitmapSet>, Option<Stored<'_>>),
    mut old: Option<OldContent<'_, '_>>,
    compressor: Option<&mut dyn Compressor>,
) -> Result<u64, GuestError> {
    let layout =
        Layout::scan_with_bitmaps(&mut *overlay, header, bitmaps).map_err(overlap_error)?;
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
    if let Some(s) = &stored {
        writer
            .bitmaps_open(s.set, s.opened)
            .map_err(store_error)
            .map_err(unproved)?;
    }
    let mut sink = WriterSink {
        writer: &mut writer,
        compressor,
    };
    copy::execute(ops, old.as_mut().map(|c| c as &mut dyn Content), &mut sink)
        .map_err(copy_error)
        .map_err(unproved)?;
    if let Some(s) = &stored {
        writer
            .bitmaps_close(s.set, s.dirt, &mut header.clone())
            .map_err(store_error)
            .map_err(unproved)?;
    }
    let bitmap_end = bitmap_rebase::log_end(writer.io_log());
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
        .unwrap_or(0)
        .max(bitmap_end))
}

/// The bitmaps QEMU stores again at close, if any (none when every one is IN_USE).
fn stored_bitmaps<'a>(
    set: Option<&'a BitmapSet>,
    opened: &'a Header,
    dirt: &'a Dirt,
) -> Option<Stored<'a>> {
    set.filter(|s| s.needs_store())
        .map(|set| Stored { set, opened, dirt })
}

/// Bitmaps QEMU stores again: the set, the header as the overlay was opened (the
/// open's in-place update rewrites it) and what the rebase's writes dirty.
struct Stored<'a> {
    set: &'a BitmapSet,
    opened: &'a Header,
    dirt: &'a Dirt,
}

/// Replay the plan through `writer` (between the bitmaps' open and close writes, when
/// QEMU stores them again) and finish it; returns where the last write ended. Guest
/// data comes from the old chain, through the compressor with `-c`.
fn write_plan<D: BlockDev, B: Below>(
    writer: Result<Writer<D, B>, WriteError>,
    ops: &[Op],
    (mut old, compressor): (Option<OldContent<'_, '_>>, Option<&mut dyn Compressor>),
    stored: Option<Stored<'_>>,
    header: &mut Header,
) -> Result<(u64, Finish), GuestError> {
    let mut writer = writer.map_err(write_error)?;
    if let Some(s) = &stored {
        writer.bitmaps_open(s.set, s.opened).map_err(write_error)?;
    }
    copy::execute(
        ops,
        old.as_mut().map(|c| c as &mut dyn Content),
        &mut WriterSink {
            writer: &mut writer,
            compressor,
        },
    )
    .map_err(copy_error)?;
    if let Some(s) = &stored {
        writer
            .bitmaps_close(s.set, s.dirt, header)
            .map_err(write_error)?;
    }
    let written_end = bitmap_rebase::log_end(writer.io_log());
    let (_, finish) = writer.finish().map_err(write_error)?;
    Ok((written_end, finish))
}

/// QEMU's errno text for a failed write, where instar knows it.
fn write_error_text(e: WriteError) -> String {
    match e {
        // qcow2_alloc_compressed_cluster_offset's -EIO.
        WriteError::CompressedOverwrite(_) => String::from(IO_ERROR),
        // qcow2_co_pwritev_compressed_task turns a compressor failure into -EINVAL.
        WriteError::CompressFailed => String::from("Invalid argument"),
        e => e.to_string(),
    }
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

impl Below for CowBacking<'_, '_> {
    fn read_below(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_zero_padded(self.0, guest_offset, buf)
    }
}

/// The writer as the copy loop's sink; data goes through the compressor with `-c`
/// (write-zeroes never do, as in qemu-img).
struct WriterSink<'w, 'c, D: BlockDev, B: Below> {
    writer: &'w mut Writer<D, B>,
    compressor: Option<&'c mut dyn Compressor>,
}

impl<D: BlockDev, B: Below> Sink for WriterSink<'_, '_, D, B> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        match self.compressor.as_deref_mut() {
            Some(c) => self.writer.write_compressed(offset, data, c),
            None => self.writer.write(offset, data),
        }
        .map_err(|e| CopyError::Write(write_error_text(e)))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.writer
            .write_zeroes(offset, len)
            .map_err(|e| CopyError::Write(write_error_text(e)))
    }
}
