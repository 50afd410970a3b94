//! virtio-blk devices as byte-addressed [`BlockDev`]s.
//!
//! virtio-blk moves whole 512-byte sectors. Aligned middles of a request go straight
//! between the caller's buffer and the device in requests of up to the device's
//! `size_max`; unaligned edges go through a one-sector bounce buffer (writes
//! read-modify-write the edge sectors). The exact byte size comes from the host's
//! [`instar_abi::Call::device_sizes`], not from the sector capacity.

use core::ptr::NonNull;
use instar_abi::layout::{virtio_mmio_addr, VIRTIO_MMIO_STRIDE};
use instar_blockdev::{BlockDev, IoError};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

use crate::heap::GuestHal;

const SECTOR: u64 = SECTOR_SIZE as u64;
/// Largest request the guest issues, even if the device allows more.
const MAX_REQUEST: usize = 4 << 20;
/// Offset of `size_max` in the virtio-blk config space.
const CONFIG_SIZE_MAX: usize = 8;

/// Why a device could not be attached.
#[derive(Debug)]
pub enum AttachError {
    NotBlock,
    Transport,
    Driver(virtio_drivers::Error),
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AttachError::NotBlock => f.write_str("not a block device"),
            AttachError::Transport => f.write_str("no virtio-mmio device"),
            AttachError::Driver(e) => write!(f, "{e}"),
        }
    }
}

pub struct Disk {
    blk: VirtIOBlk<GuestHal, MmioTransport<'static>>,
    size: u64,
    max_request: usize,
    bounce: [u8; SECTOR_SIZE],
}

impl Disk {
    /// Attach virtio-mmio device `index`, whose file is `size` bytes long.
    pub fn attach(index: usize, size: u64) -> Result<Disk, AttachError> {
        let header = NonNull::new(virtio_mmio_addr(index) as *mut VirtIOHeader)
            .ok_or(AttachError::Transport)?;
        // SAFETY: the VMM maps one virtio-mmio register file (header + config space) per
        // device at this identity-mapped address, for the whole life of the guest.
        let transport = unsafe { MmioTransport::new(header, VIRTIO_MMIO_STRIDE as usize) }
            .map_err(|_| AttachError::Transport)?;
        if transport.device_type() != DeviceType::Block {
            return Err(AttachError::NotBlock);
        }
        let size_max: u32 = transport
            .read_config_space(CONFIG_SIZE_MAX)
            .map_err(AttachError::Driver)?;
        // Whole sectors, at least one, at most MAX_REQUEST.
        let max_request = (size_max as usize).min(MAX_REQUEST) / SECTOR_SIZE * SECTOR_SIZE;
        let blk = VirtIOBlk::new(transport).map_err(AttachError::Driver)?;
        Ok(Disk {
            blk,
            size,
            max_request: max_request.max(SECTOR_SIZE),
            bounce: [0; SECTOR_SIZE],
        })
    }

    fn map_err(&self, e: virtio_drivers::Error) -> IoError {
        match e {
            virtio_drivers::Error::IoError if self.blk.readonly() => IoError::ReadOnly,
            _ => IoError::Device,
        }
    }

    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let mut sector = sector;
        for chunk in buf.chunks_mut(self.max_request) {
            let id = usize::try_from(sector).map_err(|_| IoError::OutOfRange)?;
            self.blk
                .read_blocks(id, chunk)
                .map_err(|e| self.map_err(e))?;
            sector += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        let mut sector = sector;
        for chunk in buf.chunks(self.max_request) {
            let id = usize::try_from(sector).map_err(|_| IoError::OutOfRange)?;
            self.blk
                .write_blocks(id, chunk)
                .map_err(|e| self.map_err(e))?;
            sector += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    /// Read the sector holding `offset` into the bounce buffer.
    fn load_bounce(&mut self, sector: u64) -> Result<(), IoError> {
        let id = usize::try_from(sector).map_err(|_| IoError::OutOfRange)?;
        let mut bounce = self.bounce;
        let r = self.blk.read_blocks(id, &mut bounce);
        self.bounce = bounce;
        r.map_err(|e| self.map_err(e))
    }

    fn store_bounce(&mut self, sector: u64) -> Result<(), IoError> {
        let id = usize::try_from(sector).map_err(|_| IoError::OutOfRange)?;
        let bounce = self.bounce;
        self.blk
            .write_blocks(id, &bounce)
            .map_err(|e| self.map_err(e))
    }
}

impl BlockDev for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        if end > self.size {
            return Err(IoError::OutOfRange);
        }
        let mut pos = offset;
        let mut rest = buf;
        // Unaligned head.
        if !pos.is_multiple_of(SECTOR) && !rest.is_empty() {
            let skip = (pos % SECTOR) as usize;
            let n = (SECTOR_SIZE - skip).min(rest.len());
            self.load_bounce(pos / SECTOR)?;
            let (head, tail) = rest.split_at_mut(n);
            head.copy_from_slice(&self.bounce[skip..skip + n]);
            rest = tail;
            pos += n as u64;
        }
        // Aligned middle, straight into the caller's buffer.
        let whole = rest.len() / SECTOR_SIZE * SECTOR_SIZE;
        if whole > 0 {
            let (mid, tail) = rest.split_at_mut(whole);
            self.read_sectors(pos / SECTOR, mid)?;
            rest = tail;
            pos += whole as u64;
        }
        // Unaligned tail.
        if !rest.is_empty() {
            self.load_bounce(pos / SECTOR)?;
            let n = rest.len();
            rest.copy_from_slice(&self.bounce[..n]);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        let mut pos = offset;
        let mut rest = buf;
        if !pos.is_multiple_of(SECTOR) && !rest.is_empty() {
            let skip = (pos % SECTOR) as usize;
            let n = (SECTOR_SIZE - skip).min(rest.len());
            self.load_bounce(pos / SECTOR)?;
            self.bounce[skip..skip + n].copy_from_slice(&rest[..n]);
            self.store_bounce(pos / SECTOR)?;
            rest = &rest[n..];
            pos += n as u64;
        }
        let whole = rest.len() / SECTOR_SIZE * SECTOR_SIZE;
        if whole > 0 {
            self.write_sectors(pos / SECTOR, &rest[..whole])?;
            rest = &rest[whole..];
            pos += whole as u64;
        }
        if !rest.is_empty() {
            // Past the old end the sector reads as zeros from the host.
            self.load_bounce(pos / SECTOR)?;
            self.bounce[..rest.len()].copy_from_slice(rest);
            self.store_bounce(pos / SECTOR)?;
        }
        self.size = self.size.max(end);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.blk.flush().map_err(|e| self.map_err(e))
    }
}
