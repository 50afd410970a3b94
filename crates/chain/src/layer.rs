//! One layer of a backing chain, whatever its format: its size, the allocation
//! status of a range in this layer alone, and its own data.

use instar_blockdev::{BlockDev, IoError};
use instar_qcow2::image::{ImageError, Qcow2Image};
use instar_qcow2::map::ClusterKind;
use instar_qed::{ClusterState, QedError, QedImage};
use instar_vmdk::{GrainKind, VmdkError, VmdkImage};

/// Status of a range in one layer (what `bdrv_co_block_status` says without looking
/// below): data or zeros make it allocated; unallocated lets the layer below show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerState {
    Data,
    Zero,
    Unallocated,
}

impl LayerState {
    pub fn is_allocated(self) -> bool {
        self != LayerState::Unallocated
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Qcow2(#[from] ImageError),
    #[error(transparent)]
    Vmdk(#[from] VmdkError),
    #[error(transparent)]
    Qed(#[from] QedError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("layer {layer} reported an empty or overlong run at {offset:#x}")]
    BadRun { layer: usize, offset: u64 },
    #[error("no layer {0} in the chain")]
    NoSuchLayer(usize),
    #[error("read of {len:#x} bytes at {offset:#x} goes past the virtual size")]
    BeyondVirtualSize { offset: u64, len: u64 },
}

/// A format reader for one image of a chain.
pub trait Layer {
    /// Guest-visible size in bytes, as QEMU's block layer sees it.
    fn virtual_size(&self) -> u64;
    /// Status of `[offset, offset + bytes)` in this layer only, and how many bytes
    /// from `offset` share it: `1..=min(bytes, virtual_size - offset)` for an offset
    /// inside the layer and `bytes > 0`. Callers only ask inside the layer.
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<(LayerState, u64), LayerError>;
    /// Read this layer's own content (unallocated ranges read as zeros); the range
    /// lies inside the layer.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError>;
}

impl<D: BlockDev> Layer for Qcow2Image<D> {
    fn virtual_size(&self) -> u64 {
        Qcow2Image::virtual_size(self)
    }
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<(LayerState, u64), LayerError> {
        let m = Qcow2Image::block_status(self, offset, bytes)?;
        let state = match m.kind {
            ClusterKind::Normal | ClusterKind::Compressed => LayerState::Data,
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc => LayerState::Zero,
            ClusterKind::UnallocatedPlain | ClusterKind::UnallocatedAlloc => {
                LayerState::Unallocated
            }
        };
        Ok((state, m.bytes))
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        Ok(Qcow2Image::read(self, offset, buf)?)
    }
}

impl<D: BlockDev> Layer for VmdkImage<D> {
    fn virtual_size(&self) -> u64 {
        VmdkImage::virtual_size(self)
    }
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<(LayerState, u64), LayerError> {
        let st = VmdkImage::block_status(self, offset, bytes)?;
        let state = match st.kind {
            GrainKind::Allocated | GrainKind::Compressed => LayerState::Data,
            GrainKind::Zero => LayerState::Zero,
            GrainKind::Unallocated => LayerState::Unallocated,
        };
        Ok((state, st.bytes))
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        Ok(VmdkImage::read(self, offset, buf)?)
    }
}

impl<D: BlockDev> Layer for QedImage<D> {
    fn virtual_size(&self) -> u64 {
        QedImage::virtual_size(self)
    }
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<(LayerState, u64), LayerError> {
        let (state, n) = self.find_cluster(offset, bytes)?;
        let state = match state {
            ClusterState::Found(_) => LayerState::Data,
            ClusterState::Zero => LayerState::Zero,
            ClusterState::UnallocatedL1 | ClusterState::UnallocatedL2 => LayerState::Unallocated,
        };
        Ok((state, n))
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        Ok(QedImage::read(self, offset, buf)?)
    }
}
