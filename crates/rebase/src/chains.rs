//! The old and new chains of a safe rebase, for an overlay of any format: the
//! request's devices handed out once each, the chains opened as layers (nearest
//! first), their content and allocation as the copy plan sees them
//! (`blk_old_backing`, `blk_new_backing`), and the plan over them.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use instar_abi::{ChainImage, Format, GuestError, ImageKey, RebaseRequest, RebaseStats};
use instar_blockdev::{Below, BlockDev, IoError};
use instar_chain::layer::Layer;
use instar_chain::raw::RawImage;
use instar_chain::view::ChainView;
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::OpenMode;
use instar_qed::QedImage;
use instar_vmdk::VmdkImage;

use crate::copy::{self, ChainStatus, Content, CopyError, Geometry, Op, OverlayStatus, Sink};
use crate::keyed_open::qcow2_open;
use crate::probe::open_error;
use crate::{plain, Hooks};

/// One exclusive borrow per device, handed out by index ([`take`]).
pub(crate) type Slots<'a> = Vec<Option<&'a mut dyn BlockDev>>;

pub(crate) fn slots<'a>(devs: &'a mut [&mut dyn BlockDev]) -> Slots<'a> {
    devs.iter_mut()
        .map(|d| Some(&mut **d as &'a mut dyn BlockDev))
        .collect()
}

/// A request's chains agree with its new backing: a detach names no new chain, and
/// neither does a rebase onto an image of the old chain (`in_chain`).
pub(crate) fn check_request(
    req: &RebaseRequest,
    has_backing: bool,
    in_chain: Option<u8>,
) -> Result<(), GuestError> {
    if !has_backing && !req.new_chain.is_empty() {
        return Err(plain("a detach request names a new chain"));
    }
    if in_chain.is_some() && !req.new_chain.is_empty() {
        return Err(plain("an in-chain request also names a new chain"));
    }
    Ok(())
}

/// The old and new chains of a request, opened.
pub(crate) struct Opened<'a> {
    pub old_view: ChainView<'a>,
    pub new_view: ChainView<'a>,
    pub old_len: usize,
    /// In-chain: the new content is the old chain from this layer down.
    pub new_from: Option<usize>,
}

/// Open the request's old and new chains from `slots`.
pub(crate) fn open_chains<'a>(
    req: &RebaseRequest,
    in_chain: Option<u8>,
    slots: &mut [Option<&'a mut dyn BlockDev>],
) -> Result<Opened<'a>, GuestError> {
    let old_layers = open_chain(&req.old_chain, slots, "old", &req.keys)?;
    let new_layers = open_chain(&req.new_chain, slots, "new", &req.keys)?;
    let old_len = old_layers.len();
    let new_from = match in_chain {
        Some(i) if usize::from(i) < old_len => Some(usize::from(i)),
        Some(i) => return Err(plain(format!("in-chain index {i} outside the old chain"))),
        None => None,
    };
    Ok(Opened {
        old_view: ChainView::new(old_layers),
        new_view: ChainView::new(new_layers),
        old_len,
        new_from,
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
fn open_chain<'a>(
    chain: &[ChainImage],
    slots: &mut [Option<&'a mut dyn BlockDev>],
    which: &str,
    keys: &[ImageKey],
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
                let key = keys.iter().find(|k| k.dev == img.dev);
                let (header, _, crypt) = qcow2_open(dev, OpenMode::ReadOnly, img.dev, key)?;
                // Checked as QEMU's read-only open checks them; never written.
                crate::bitmap_rebase::load_read_only(dev, &header, img.dev)?;
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
                        .map_err(|e| open_error(img.dev, e.to_string()))?
                        .with_crypt(crypt),
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

/// Copy-on-write source of the vmdk and qed writers: the old chain, zeros past its end.
pub(crate) struct OldBelow<'r, 'a>(pub(crate) Shared<'r, 'a>);

impl Below for OldBelow<'_, '_> {
    fn read_below(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_zero_padded(self.0, guest_offset, buf)
    }
}

/// A writer that fills the rest of a unit it allocates from the layers below (vmdk's
/// sparse writer, qed's writer); errors as text for [`CopyError::Write`].
pub(crate) trait CowWriter {
    fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        below: Option<&mut dyn Below>,
    ) -> Result<(), String>;
    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        below: Option<&mut dyn Below>,
    ) -> Result<(), String>;
}

/// The copy loop's [`Sink`] over a [`CowWriter`]; `below` is `None` without an old
/// chain.
pub(crate) struct CowSink<'w, 'r, 'a, W: CowWriter> {
    pub(crate) writer: &'w mut W,
    pub(crate) below: Option<OldBelow<'r, 'a>>,
}

impl<W: CowWriter> Sink for CowSink<'_, '_, '_, W> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        let below = self.below.as_mut().map(|b| b as &mut dyn Below);
        self.writer
            .write(offset, data, below)
            .map_err(CopyError::Write)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        let below = self.below.as_mut().map(|b| b as &mut dyn Below);
        self.writer
            .write_zeroes(offset, len, below)
            .map_err(CopyError::Write)
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
