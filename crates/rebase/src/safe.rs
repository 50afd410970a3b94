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

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use instar_abi::{
    ChainImage, ErrorKind, Format, GuestError, RebaseOutcome, RebaseRequest, RebaseStats,
};
use instar_blockdev::{BlockDev, IoError};
use instar_chain::layer::Layer;
use instar_chain::raw::RawImage;
use instar_chain::view::ChainView;
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::overlap::{Layout, OverlapError};
use instar_qcow2::writer::{BackingRead, Finish, IoOp, ShadowDev, WriteError, WriteKind, Writer};
use instar_qcow2::{Header, OpenMode};
use instar_qed::QedImage;
use instar_vmdk::VmdkImage;

use crate::copy::{self, ChainStatus, Content, CopyError, Geometry, Op, OverlayStatus, Sink};
use crate::probe::{open_error, qcow2_info};
use crate::unsafe_rebase::{change_error, map_change_error, open_for_change};
use crate::{Hooks, IO_ERROR};

/// The overlay is always device 0.
const OVERLAY: u8 = 0;

fn plain(message: String) -> GuestError {
    GuestError {
        kind: ErrorKind::Plain,
        message,
    }
}

pub(crate) fn rebase<'a>(
    req: &RebaseRequest,
    devs: &'a mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    if req.overlay_format != Format::Qcow2 {
        return Err(change_error("Operation not supported"));
    }
    let backing = req.new_backing.as_ref().filter(|b| !b.name.is_empty());
    let name = backing.map(|b| b.name.as_slice());
    let format = backing.and_then(|b| b.format.as_deref());
    if backing.is_none() && !req.new_chain.is_empty() {
        return Err(plain(String::from("a detach request names a new chain")));
    }
    if req.in_chain.is_some() && !req.new_chain.is_empty() {
        return Err(plain(String::from(
            "an in-chain request also names a new chain",
        )));
    }

    // One exclusive borrow per device, handed out by index.
    let mut slots: Vec<Option<&'a mut dyn BlockDev>> = devs
        .iter_mut()
        .map(|d| Some(&mut **d as &'a mut dyn BlockDev))
        .collect();
    let overlay = take(&mut slots, OVERLAY)?;

    // 1. Everything that can fail before a write.
    let (mut header, _) = open_for_change(overlay, req, name, format)?;

    let old_layers = open_chain(&req.old_chain, &mut slots, "old")?;
    let new_layers = open_chain(&req.new_chain, &mut slots, "new")?;
    let old_len = old_layers.len();
    let mut old_view = ChainView::new(old_layers);
    let mut new_view = ChainView::new(new_layers);
    let new_from = match req.in_chain {
        Some(i) if usize::from(i) < old_len => Some(usize::from(i)),
        Some(i) => return Err(plain(format!("in-chain index {i} outside the old chain"))),
        None => None,
    };

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
    prove_writes(&mut *overlay, &header, &plan.ops, has_backing)?;

    // 3. Write.
    hooks.write_phase(
        crate::write_end::plan_end(overlay_len, cluster_size, &plan.ops).max(cluster_size),
    );
    // QEMU opens the overlay with its old backing; v2 write-zeroes then fall back to
    // writing zero data. A v2 overlay without a backing file would lose content in
    // QEMU (its zero write becomes a no-op discard): instar writes zero data there too.
    let old_content = (old_len > 0).then_some(OldContent(&old));
    let (written_end, finish) = if old_len > 0 || header.version < 3 {
        let writer = Writer::open_with_backing(&mut *overlay, &header, CowBacking(&old));
        write_plan(writer, &plan.ops, old_content)?
    } else {
        write_plan(
            Writer::open(&mut *overlay, &header, false),
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
        repair_lines: Vec::new(),
    })
}

/// The old and new chains as qemu-img sets them up for the copy loop.
pub(crate) struct Chains<'r, 'v, 'a> {
    pub old: Shared<'r, 'a>,
    pub old_len: usize,
    /// In-chain: the new content is the old chain from this layer down.
    pub new_from: Option<usize>,
    pub new_view: &'v mut ChainView<'a>,
}

/// Pass 1 for an overlay of any format: plan the copy over `chains`, reporting progress
/// only when `-p` asked for it (each report is a VM exit).
pub(crate) fn plan_over(
    geom: Geometry,
    overlay: &mut dyn OverlayStatus,
    chains: Chains<'_, '_, '_>,
    progress: bool,
    hooks: &mut dyn Hooks,
) -> Result<copy::Plan, GuestError> {
    let old = chains.old;
    let mut old_content = (chains.old_len > 0).then_some(OldContent(old));
    let mut in_chain = chains.new_from.map(|k| InChain(old, k));
    let mut new_content: Option<Box<dyn Content + '_>> = match chains.new_from {
        Some(k) => Some(Box::new(InChainContent(old, k))),
        None if !chains.new_view.is_empty() => Some(Box::new(ViewContent(chains.new_view))),
        None => None,
    };
    copy::plan(
        geom,
        overlay,
        in_chain.as_mut().map(|c| c as &mut dyn ChainStatus),
        old_content.as_mut().map(|c| c as &mut dyn Content),
        new_content.as_deref_mut(),
        &mut |steps| {
            if progress {
                hooks.progress(steps)
            }
        },
    )
    .map_err(copy_error)
}

/// Clusters and bytes of data copied (zero writes copy nothing).
pub(crate) fn stats(ops: &[Op], cluster_size: u64) -> RebaseStats {
    let mut s = RebaseStats::default();
    let mut last_cluster = None;
    for op in ops {
        if let Op::Data { offset, len } = *op {
            s.bytes_copied += len;
            let first = offset / cluster_size;
            let last = (offset + len - 1) / cluster_size;
            let first = if last_cluster == Some(first) {
                first + 1
            } else {
                first
            };
            s.clusters_copied += (last + 1).saturating_sub(first);
            last_cluster = Some(last);
        }
    }
    s
}

pub(crate) fn take<'a>(
    slots: &mut [Option<&'a mut dyn BlockDev>],
    dev: u8,
) -> Result<&'a mut dyn BlockDev, GuestError> {
    slots
        .get_mut(usize::from(dev))
        .and_then(Option::take)
        .ok_or_else(|| plain(format!("device {dev} is missing or used twice")))
}

/// Open each image of a chain as a layer, nearest first.
pub(crate) fn open_chain<'a>(
    chain: &[ChainImage],
    slots: &mut [Option<&'a mut dyn BlockDev>],
    which: &str,
) -> Result<Vec<Box<dyn Layer + 'a>>, GuestError> {
    let read_error = || plain(format!("error while reading from {which} backing file"));
    let mut layers: Vec<Box<dyn Layer + 'a>> = Vec::with_capacity(chain.len());
    let mut prev_vmdk_parent_cid: Option<u32> = None;
    for img in chain {
        let dev = take(slots, img.dev)?;
        let mut this_cid = None;
        let layer: Box<dyn Layer + 'a> = match img.format {
            Format::Raw => Box::new(RawImage::new(dev)),
            Format::Qcow2 => {
                let (header, _) = qcow2_info(dev, OpenMode::ReadOnly, img.dev)?;
                if header.has_data_file() {
                    return Err(open_error(
                        img.dev,
                        String::from(
                            "instar does not read qcow2 images with an external data file",
                        ),
                    ));
                }
                Box::new(
                    Qcow2Image::open(dev, &header)
                        .map_err(|e| open_error(img.dev, e.to_string()))?,
                )
            }
            Format::Qed => {
                Box::new(QedImage::open(dev).map_err(|e| open_error(img.dev, e.to_string()))?)
            }
            Format::Vmdk => {
                let v = VmdkImage::open(dev).map_err(|e| open_error(img.dev, e.to_string()))?;
                this_cid = Some((v.descriptor().cid, v.descriptor().parent_cid));
                Box::new(v)
            }
            other => {
                return Err(open_error(
                    img.dev,
                    format!("instar does not read {} images", other.name()),
                ))
            }
        };
        // QEMU refuses reads through a vmdk whose parentCID is not its parent's CID.
        if let Some(want) = prev_vmdk_parent_cid.take() {
            match this_cid {
                Some((cid, _)) if cid == want => {}
                _ => return Err(read_error()),
            }
        }
        if let Some((_, parent_cid)) = this_cid {
            prev_vmdk_parent_cid = Some(parent_cid);
        }
        layers.push(layer);
    }
    Ok(layers)
}

/// Prove that the plan's writes land only where they may: find every structure of the
/// overlay, replay the plan through the writer into memory (guest data left out, so
/// nothing is read from the old chain and nothing reaches the device), and audit every
/// cluster the writer wrote or took, plus the final header rewrite.
fn prove_writes(
    overlay: &mut dyn BlockDev,
    header: &Header,
    ops: &[Op],
    has_backing: bool,
) -> Result<(), GuestError> {
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
    layout.audit(overlay, &record).map_err(overlap_error)
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

pub(crate) fn copy_error(e: CopyError) -> GuestError {
    plain(match e {
        CopyError::Metadata(m) => format!("error while reading image metadata: {m}"),
        CopyError::ReadOld => String::from("error while reading from old backing file"),
        CopyError::ReadNew => String::from("error while reading from new backing file"),
        CopyError::Write(m) => format!("Error while writing to COW image: {m}"),
        CopyError::TooManyRequests => String::from(
            "instar: the rebase needs too many write requests for the sandbox's memory",
        ),
        CopyError::BadStatus => {
            String::from("error while reading image metadata: bad block status")
        }
    })
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

pub(crate) type Shared<'r, 'a> = &'r RefCell<&'r mut ChainView<'a>>;

/// The old chain's content (`blk_old_backing`).
pub(crate) struct OldContent<'r, 'a>(pub(crate) Shared<'r, 'a>);

impl Content for OldContent<'_, '_> {
    fn size(&self) -> u64 {
        self.0.borrow().virtual_size()
    }
    fn known_zero(&mut self, offset: u64, len: u64) -> Result<bool, CopyError> {
        unallocated(&mut self.0.borrow_mut(), 0, offset, len)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        self.0
            .borrow_mut()
            .read(offset, buf)
            .map_err(|_| CopyError::ReadOld)
    }
}

/// The new backing when it is an image of the old chain: read from layer `k` down.
pub(crate) struct InChainContent<'r, 'a>(pub(crate) Shared<'r, 'a>, pub(crate) usize);

impl Content for InChainContent<'_, '_> {
    fn size(&self) -> u64 {
        self.0
            .borrow_mut()
            .layer_mut(self.1)
            .map_or(0, |l| l.virtual_size())
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        self.0
            .borrow_mut()
            .read_from(self.1, offset, buf)
            .map_err(|_| CopyError::ReadNew)
    }
    fn known_zero(&mut self, offset: u64, len: u64) -> Result<bool, CopyError> {
        unallocated(&mut self.0.borrow_mut(), self.1, offset, len)
    }
}

/// `bdrv_is_allocated_above(old top, -b image, include_base = false)`.
pub(crate) struct InChain<'r, 'a>(pub(crate) Shared<'r, 'a>, pub(crate) usize);

impl ChainStatus for InChain<'_, '_> {
    fn is_allocated_above(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError> {
        let above = self
            .0
            .borrow_mut()
            .is_allocated_above(0, Some(self.1), offset, bytes)
            .map_err(|e| CopyError::Metadata(e.to_string()))?;
        Ok((above.layer.is_some(), above.bytes))
    }
}

/// The new chain's content (`blk_new_backing`).
pub(crate) struct ViewContent<'r, 'a>(pub(crate) &'r mut ChainView<'a>);

impl Content for ViewContent<'_, '_> {
    fn size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        self.0.read(offset, buf).map_err(|_| CopyError::ReadNew)
    }
    fn known_zero(&mut self, offset: u64, len: u64) -> Result<bool, CopyError> {
        unallocated(self.0, 0, offset, len)
    }
}

/// Whether no layer from `from` down allocates any of `[offset, offset + len)`, so that
/// the range reads as zeros. Zeros a short layer shows past its end count as allocated
/// there (QEMU's rule), which only makes the answer more conservative.
pub(crate) fn unallocated(
    view: &mut ChainView<'_>,
    from: usize,
    mut offset: u64,
    len: u64,
) -> Result<bool, CopyError> {
    let end = offset.saturating_add(len);
    while offset < end {
        let above = view
            .is_allocated_above(from, None, offset, end - offset)
            .map_err(|e| CopyError::Metadata(e.to_string()))?;
        if above.layer.is_some() || above.bytes == 0 {
            return Ok(false);
        }
        offset += above.bytes;
    }
    Ok(true)
}

/// Copy-on-write source for the writer: the overlay's old backing, zeros past its end.
struct CowBacking<'r, 'a>(Shared<'r, 'a>);

impl BackingRead for CowBacking<'_, '_> {
    fn read_backing(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_zero_padded(self.0, guest_offset, buf)
    }
}

/// Read the old chain at `guest_offset`, zeros past its end (copy-on-write padding of
/// a partly written new cluster or grain).
pub(crate) fn read_zero_padded(
    old: Shared<'_, '_>,
    guest_offset: u64,
    buf: &mut [u8],
) -> Result<(), IoError> {
    let mut view = old.borrow_mut();
    let size = view.virtual_size();
    let avail = size.saturating_sub(guest_offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    tail.fill(0);
    if !head.is_empty() {
        view.read(guest_offset, head).map_err(|_| IoError::Device)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_each_cluster_once() {
        let cs = 65536;
        let ops = [
            Op::Data {
                offset: 0,
                len: 4096,
            },
            Op::Data {
                offset: 8192,
                len: 4096,
            },
            Op::Zero {
                offset: cs,
                len: cs,
            },
            Op::Data {
                offset: 2 * cs,
                len: 2 * cs,
            },
        ];
        let s = stats(&ops, cs);
        assert_eq!(s.bytes_copied, 4096 + 4096 + 2 * cs);
        assert_eq!(s.clusters_copied, 3);
    }
}
