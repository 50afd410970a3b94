//! virtio-blk over virtio-mmio (version 2 register layout), host side.
//!
//! One device per image file. The guest is hostile: every descriptor is checked against
//! guest memory (vm-memory slices) and every request against the device's size; a
//! read-only device refuses writes whatever the guest negotiated. Data moves with
//! `pread64`/`pwrite64` straight between the file and guest memory, large reads shared
//! between threads by [`crate::io_pool`]; every buffer of a request is checked before
//! any data moves. There are no
//! interrupts: the guest polls the used ring, and a notify is answered by completing
//! every available request before the vCPU resumes.
//!
//! Every guest-driven quantity is bounded before the device allocates or loops (see
//! docs/sandbox-bounds.md): a chain holds at most [`crate::chain::MAX_CHAIN`]
//! descriptors (read by [`crate::chain::walk`] into a buffer allocated once), one
//! notify serves at most the queue size of requests (more made available at once ends
//! the VM) and moves at most [`MAX_NOTIFY_BYTES`], and the queue's layout is frozen
//! while it is ready. A writable device refuses writes until the guest has declared its
//! write phase, and past the declared end or the host's bound ([`BlockDevice::new`]).
//!
//! Completed writes are counted in a [`WriteCount`] shared by all devices of a VM; with
//! a limit set (fault injection for crash-consistency tests), the device that completes
//! the limit-th write stops serving requests at once and the VM is stopped.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::chain::{self, Seg, MAX_CHAIN};
use crate::io_pool::{Dir, IoPool, Piece};
use crate::memory::GuestMemory;
pub use crate::write_count::{BlockOp, WriteCount};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_ID_BLOCK: u32 = 2;
const VENDOR_ID: u32 = 0x5241_5453; // "STAR"

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

// Feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_VERSION_1: u64 = 1 << 32;

// Request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the guest.
const QUEUE_MAX: u16 = 256;
/// Largest single data segment, and data segments per request. Generous: the guest moves
/// bulk data in requests of several MiB.
pub const SIZE_MAX: u32 = 16 << 20;
pub const SEG_MAX: u32 = 128;
/// The bound on a writable device's growth when the caller gives none
/// ([`crate::Config::virtual_size`] unset): writes may then reach this offset, or the
/// file's length if larger, as far as the guest's declared write end allows. The guest
/// knows the exact size from the call, not from the capacity.
pub const WRITABLE_CAPACITY: u64 = 1 << 50;
/// Data one notify may move, over all its requests. A real guest has one request of at
/// most 4 MiB in flight; guest RAM is at most 2 GiB. Requests past it fail.
pub const MAX_NOTIFY_BYTES: u64 = 1 << 30;
/// GET_ID answer length.
const ID_LEN: usize = 20;

/// The file behind a device: borrowed from the caller, or a read-only reopen of it.
pub enum Backing<'a> {
    Borrowed(&'a File),
    Owned(File),
}

impl Backing<'_> {
    fn file(&self) -> &File {
        match self {
            Backing::Borrowed(f) => f,
            Backing::Owned(f) => f,
        }
    }
}

/// One virtio-blk device: its register file, its queue and its file.
pub struct BlockDevice<'a> {
    index: usize,
    backing: Backing<'a>,
    writable: bool,
    /// The file's length when the VM started.
    len: u64,
    capacity_bytes: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    queue: Queue,
    /// Set when the guest misprogrammed the queue; the device then ignores notifies.
    broken: bool,
    /// The current request's descriptors; never grows past [`MAX_CHAIN`].
    segs: Vec<Seg>,
    /// The host's bound on the end of writes (a sector multiple).
    write_cap: u64,
    /// The end writes may reach: 0 until the write phase, then the guest's declared
    /// end within `write_cap`.
    write_end: u64,
}

/// `len` rounded up to a whole sector, saturating at the last whole sector.
fn round_up_to_sector(len: u64) -> u64 {
    len.div_ceil(SECTOR_SIZE).saturating_mul(SECTOR_SIZE)
}

fn low(v: u64) -> u32 {
    v as u32
}
fn high(v: u64) -> u32 {
    (v >> 32) as u32
}

impl<'a> BlockDevice<'a> {
    /// A device over `backing`, whose length is `len` bytes. A writable one may be
    /// written up to `write_cap` (or its length, if larger), once the write phase began.
    pub fn new(
        index: usize,
        backing: Backing<'a>,
        len: u64,
        writable: bool,
        write_cap: u64,
    ) -> Self {
        let sectors_bytes = round_up_to_sector(len);
        let write_cap = if writable {
            sectors_bytes.max(round_up_to_sector(write_cap))
        } else {
            0
        };
        let capacity_bytes = sectors_bytes.max(write_cap);
        BlockDevice {
            index,
            backing,
            writable,
            len,
            capacity_bytes,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            // QUEUE_MAX is a valid power of two, so this cannot fail.
            queue: Queue::new(QUEUE_MAX).unwrap_or_else(|_| unreachable!()),
            broken: false,
            segs: Vec::with_capacity(MAX_CHAIN),
            write_cap,
            write_end: 0,
        }
    }

    /// The write phase began: writes may now reach `declared_end` (rounded up to a
    /// sector), within the host's bound.
    pub fn start_writes(&mut self, declared_end: u64) {
        self.write_end = round_up_to_sector(declared_end).min(self.write_cap);
    }

    pub fn fd(&self) -> RawFd {
        self.backing.file().as_raw_fd()
    }

    /// The file's length when the VM started.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    fn device_features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_INDIRECT_DESC;
        if !self.writable {
            f |= F_RO;
        }
        f
    }

    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.capacity_bytes / SECTOR_SIZE).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (4 bytes) stays zero
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.queue.reset();
        self.broken = false;
    }

    /// An MMIO read at `offset` within this device's window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            let config = self.config_space();
            let start = (offset - REG_CONFIG) as usize;
            if let Some(src) = config.get(start..start.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => DEVICE_ID_BLOCK,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.device_features()),
                1 => high(self.device_features()),
                _ => 0,
            },
            REG_QUEUE_NUM_MAX if self.queue_sel == 0 => QUEUE_MAX as u32,
            REG_QUEUE_READY if self.queue_sel == 0 => self.queue.ready() as u32,
            REG_INTERRUPT_STATUS => 0,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// An MMIO write at `offset` within this device's window. `Err` ends the VM, with
    /// the reason.
    pub fn mmio_write(
        &mut self,
        offset: u64,
        data: &[u8],
        mem: &GuestMemory,
        pool: &IoPool,
        writes: &mut WriteCount,
    ) -> Result<(), String> {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Ok(());
        };
        let v = u32::from_le_bytes(bytes);
        let q0 = self.queue_sel == 0;
        // The queue's layout is frozen while it is ready (the driver must not change it).
        let q0_idle = q0 && !self.queue.ready();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                let offered = self.device_features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (v as u64 & offered)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32 & offered)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if q0_idle => self.queue.set_size(v as u16),
            REG_QUEUE_READY if q0 => {
                self.queue.set_ready(v == 1);
                if v == 1 && !self.queue.is_valid(mem) {
                    self.broken = true;
                }
            }
            REG_QUEUE_DESC_LOW if q0_idle => self.queue.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH if q0_idle => self.queue.set_desc_table_address(None, Some(v)),
            REG_QUEUE_DRIVER_LOW if q0_idle => self.queue.set_avail_ring_address(Some(v), None),
            REG_QUEUE_DRIVER_HIGH if q0_idle => self.queue.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_DEVICE_LOW if q0_idle => self.queue.set_used_ring_address(Some(v), None),
            REG_QUEUE_DEVICE_HIGH if q0_idle => self.queue.set_used_ring_address(None, Some(v)),
            REG_QUEUE_NOTIFY if v == 0 => return self.process_queue(mem, pool, writes),
            REG_INTERRUPT_ACK => {}
            REG_STATUS => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Complete the requests available at the notify: at most the queue size of them,
    /// moving at most [`MAX_NOTIFY_BYTES`]. Stops early when the write limit is hit or
    /// the VM's deadline passed (the run loop then ends the VM). `Err`: the guest made
    /// more requests available than the queue holds.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemory,
        pool: &IoPool,
        writes: &mut WriteCount,
    ) -> Result<(), String> {
        if self.broken || !self.queue.ready() {
            return Ok(());
        }
        let size = self.queue.size();
        // Read once: a request whose buffer overlaps the ring cannot extend the batch.
        let Ok(avail) = self.queue.avail_idx(mem, Ordering::Acquire) else {
            self.broken = true;
            return Ok(());
        };
        let pending = avail.0.wrapping_sub(self.queue.next_avail());
        if size == 0 || pending > size {
            return Err(format!(
                "device {}: the guest made {pending} requests available at once, the queue \
                 holds {size}",
                self.index
            ));
        }
        let mut budget = MAX_NOTIFY_BYTES;
        for _ in 0..pending {
            if crate::watchdog::deadline_passed() {
                return Ok(());
            }
            let next = self.queue.next_avail();
            // The ring entry: 4 bytes of flags and index, then 2 bytes per slot.
            let slot = self
                .queue
                .avail_ring()
                .checked_add(4 + 2 * u64::from(next % size));
            let Some(Ok(head)) = slot.map(|a| mem.read_obj::<u16>(GuestAddress(a))) else {
                self.broken = true;
                return Ok(());
            };
            self.queue.set_next_avail(next.wrapping_add(1));
            let table = GuestAddress(self.queue.desc_table());
            let used = match chain::walk(mem, table, size, head, &mut self.segs) {
                Ok(()) => self.handle_request(mem, pool, &mut budget, writes),
                // A malformed chain: no status byte can be trusted, used length 0.
                Err(_) => 0,
            };
            if writes.stopped {
                // As if the host died right after the write reached the file: the
                // guest never sees it complete.
                return Ok(());
            }
            if self.queue.add_used(mem, head, used).is_err() {
                self.broken = true;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Serve the request in `self.segs`; returns the number of bytes written to guest
    /// memory.
    fn handle_request(
        &self,
        mem: &GuestMemory,
        pool: &IoPool,
        budget: &mut u64,
        writes: &mut WriteCount,
    ) -> u32 {
        let descs = self.segs.as_slice();
        // Header (device-readable) first, status byte (device-writable) last.
        let (Some(hdr), Some(st)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || hdr.write_only || !st.write_only || hdr.len < 16 || st.len < 1 {
            return 0;
        }
        let Ok(hdr) = mem.read_obj::<[u8; 16]>(hdr.addr) else {
            return 0;
        };
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        // The status byte is the last byte of the last descriptor; the bytes before it
        // are a data buffer.
        let Some(status_addr) = st.addr.0.checked_add(u64::from(st.len) - 1) else {
            return 0;
        };
        let lead = (st.len > 1).then_some(Seg {
            len: st.len - 1,
            ..*st
        });
        let data = Data {
            middle: &descs[1..descs.len() - 1],
            lead,
        };
        let (status, written) = match req_type {
            T_IN => self.transfer(mem, pool, sector, data, budget, true),
            T_OUT if !self.writable => (S_IOERR, 0),
            T_OUT => {
                if writes.limit_reached() {
                    // Only `Some(0)` gets here: stop before the first write.
                    writes.stopped = true;
                    (S_IOERR, 0)
                } else {
                    let r = self.transfer(mem, pool, sector, data, budget, false);
                    if r.0 == S_OK {
                        writes.done += 1;
                        writes.stopped = writes.limit_reached();
                        if writes.log.is_some() {
                            writes.record(BlockOp::Write {
                                device: self.index,
                                offset: sector.saturating_mul(SECTOR_SIZE),
                                len: data.iter().map(|d| u64::from(d.len)).sum(),
                            });
                        }
                    }
                    r
                }
            }
            T_FLUSH => {
                // SAFETY: fdatasync on a file descriptor this device owns or borrows.
                let r = unsafe { libc::fdatasync(self.fd()) };
                if r == 0 {
                    writes.record(BlockOp::Flush { device: self.index });
                }
                (if r == 0 { S_OK } else { S_IOERR }, 0)
            }
            T_GET_ID => self.get_id(mem, data),
            _ => (S_UNSUPP, 0),
        };
        if writes.stopped {
            return 0;
        }
        if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    fn get_id(&self, mem: &GuestMemory, data: Data<'_>) -> (u8, u32) {
        let mut segs = data.iter();
        let (Some(seg), None) = (segs.next(), segs.next()) else {
            return (S_IOERR, 0);
        };
        if !seg.write_only {
            return (S_IOERR, 0);
        }
        let mut id = [0u8; ID_LEN];
        let text = format!("instar-{}", self.index);
        let n = text.len().min(ID_LEN);
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
        let n = (seg.len as usize).min(ID_LEN);
        match mem.write_slice(&id[..n], seg.addr) {
            Ok(()) => (S_OK, n as u32),
            Err(_) => (S_IOERR, 0),
        }
    }

    /// A read (`into_guest`) or write of the data descriptors at `sector`, charged to
    /// the notify's `budget`.
    fn transfer(
        &self,
        mem: &GuestMemory,
        pool: &IoPool,
        sector: u64,
        data: Data<'_>,
        budget: &mut u64,
        into_guest: bool,
    ) -> (u8, u32) {
        let count = data.iter().count();
        if count == 0 || count > SEG_MAX as usize {
            return (S_IOERR, 0);
        }
        // At most SEG_MAX * SIZE_MAX = 2 GiB: no overflow.
        let mut total: u64 = 0;
        for seg in data.iter() {
            // A read needs device-writable buffers, a write device-readable ones.
            if seg.write_only != into_guest || seg.len > SIZE_MAX {
                return (S_IOERR, 0);
            }
            total += u64::from(seg.len);
        }
        if total > *budget {
            return (S_IOERR, 0);
        }
        let Some(start) = sector.checked_mul(SECTOR_SIZE) else {
            return (S_IOERR, 0);
        };
        if !total.is_multiple_of(SECTOR_SIZE)
            || start
                .checked_add(total)
                .is_none_or(|end| end > self.capacity_bytes)
        {
            return (S_IOERR, 0);
        }
        // Writes: only in the write phase, and never past the end it allows.
        if !into_guest && (!self.writable || start + total > self.write_end) {
            return (S_IOERR, 0);
        }
        *budget -= total;
        // Every buffer is checked before any data moves.
        let mut pieces = Vec::with_capacity(count);
        let mut pos = start;
        for seg in data.iter() {
            let len = seg.len;
            let Ok(slice) = mem.get_slice(seg.addr, len as usize) else {
                return (S_IOERR, 0);
            };
            // SAFETY: the slice is guest RAM checked by get_slice. Guest RAM is one plain
            // mmap (no Xen grants, so the guard is a no-op) that outlives this call, and
            // `pool.execute` returns only when nothing uses the pieces any more. The vCPU
            // is stopped while the device runs; the fd is this device's file.
            pieces.push(unsafe {
                Piece::new(self.fd(), slice.ptr_guard_mut().as_ptr(), len as usize, pos)
            });
            pos += len as u64;
        }
        let dir = if into_guest { Dir::Read } else { Dir::Write };
        if !pool.execute(dir, &pieces) {
            return (S_IOERR, 0);
        }
        // total <= 2 GiB fits a u32.
        let written = if into_guest { total as u32 } else { 0 };
        (S_OK, written)
    }
}

/// A request's data buffers: the descriptors between the header and the status, then
/// the bytes of the status descriptor before its last one.
#[derive(Clone, Copy)]
struct Data<'s> {
    middle: &'s [Seg],
    lead: Option<Seg>,
}

impl Data<'_> {
    fn iter(&self) -> impl Iterator<Item = Seg> + '_ {
        self.middle.iter().copied().chain(self.lead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x11000;
    const USED: u64 = 0x12000;
    const BUF: u64 = 0x20000;
    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;
    const QSIZE: u16 = 256;

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn temp(tag: &str, contents: &[u8]) -> (TempFile, File) {
        let path = std::env::temp_dir().join(format!("instar-vmm-{}-{tag}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(contents).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (TempFile(path), file)
    }

    /// A minimal split-queue driver, programming the device through its registers.
    struct Driver<'a> {
        mem: GuestMemory,
        pool: IoPool,
        dev: BlockDevice<'a>,
        next_desc: u16,
        avail_idx: u16,
        writes: WriteCount,
    }

    impl<'a> Driver<'a> {
        fn new(file: &'a File, writable: bool) -> Self {
            Self::with_pool(file, writable, IoPool::inline())
        }
        fn with_pool(file: &'a File, writable: bool, pool: IoPool) -> Self {
            let mem = crate::memory::create(crate::memory::MIN_RAM).unwrap();
            let len = file.metadata().unwrap().len();
            let mut d = Driver {
                mem,
                pool,
                dev: BlockDevice::new(3, Backing::Borrowed(file), len, writable, 1 << 20),
                next_desc: 0,
                avail_idx: 0,
                writes: WriteCount::default(),
            };
            d.w(REG_STATUS, 1 | 2);
            d.w(REG_DRIVER_FEATURES_SEL, 1);
            d.w(REG_DRIVER_FEATURES, 1);
            d.w(REG_QUEUE_SEL, 0);
            d.w(REG_QUEUE_NUM, QSIZE as u32);
            d.w(REG_QUEUE_DESC_LOW, DESC as u32);
            d.w(REG_QUEUE_DRIVER_LOW, AVAIL as u32);
            d.w(REG_QUEUE_DEVICE_LOW, USED as u32);
            d.w(REG_QUEUE_READY, 1);
            // Most tests are in the write phase; `phase_and_end_bound_writes` is not.
            d.dev.start_writes(u64::MAX);
            d
        }
        fn w(&mut self, reg: u64, v: u32) {
            self.try_w(reg, v).unwrap();
        }
        fn try_w(&mut self, reg: u64, v: u32) -> Result<(), String> {
            self.dev.mmio_write(
                reg,
                &v.to_le_bytes(),
                &self.mem,
                &self.pool,
                &mut self.writes,
            )
        }
        fn r(&mut self, reg: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.mmio_read(reg, &mut b);
            u32::from_le_bytes(b)
        }
        /// Queue one chain without notifying.
        fn add(&mut self, chain: &[(u64, u32, bool)]) {
            let at = self.next_desc;
            self.add_at(at, chain);
        }
        /// Queue one chain at descriptor `at`.
        fn add_at(&mut self, at: u16, chain: &[(u64, u32, bool)]) {
            self.next_desc = at % QSIZE;
            let head = self.next_desc;
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let idx = self.next_desc;
                let last = i + 1 == chain.len();
                let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let at = DESC + 16 * idx as u64;
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem.write_obj(idx + 1, GuestAddress(at + 14)).unwrap();
                self.next_desc += 1;
            }
            let slot = AVAIL + 4 + 2 * (self.avail_idx % QSIZE) as u64;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx += 1;
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }
        fn notify(&mut self) {
            self.w(REG_QUEUE_NOTIFY, 0);
        }
        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }
        fn used_len(&self, i: u16) -> u32 {
            self.mem
                .read_obj(GuestAddress(USED + 4 + 8 * i as u64 + 4))
                .unwrap()
        }
        fn header(&self, at: u64, t: u32, sector: u64) {
            self.mem.write_obj(t, GuestAddress(at)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }
        fn status(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
        /// One request of `t` at `sector` with one data buffer at BUF.
        fn request(&mut self, t: u32, sector: u64, data_len: u32, write_only: bool) -> (u8, u32) {
            let hdr = BUF - 0x100;
            let st = BUF - 0x10;
            self.header(hdr, t, sector);
            self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
            let before = self.used_idx();
            self.add(&[(hdr, 16, false), (BUF, data_len, write_only), (st, 1, true)]);
            self.notify();
            assert_eq!(self.used_idx(), before.wrapping_add(1));
            (self.status(st), self.used_len(before))
        }
    }

    #[test]
    fn registers_and_config() {
        let (_t, file) = temp("regs", &[1u8; 700]);
        let mut d = Driver::new(&file, false);
        assert_eq!(d.r(REG_MAGIC), MAGIC);
        assert_eq!(d.r(REG_VERSION), 2);
        assert_eq!(d.r(REG_DEVICE_ID), 2);
        d.w(REG_DEVICE_FEATURES_SEL, 0);
        assert_ne!(d.r(REG_DEVICE_FEATURES) & F_RO as u32, 0);
        d.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.r(REG_DEVICE_FEATURES), 1, "VERSION_1");
        // 700 bytes = 2 sectors.
        assert_eq!(d.r(REG_CONFIG), 2);
        assert_eq!(d.r(REG_CONFIG + 4), 0);
        assert_eq!(d.r(REG_CONFIG + 8), SIZE_MAX);
    }

    #[test]
    fn read_past_end_of_file_is_zeros_and_past_capacity_fails() {
        let contents: Vec<u8> = (0..700u32).map(|i| (i % 251) as u8 + 1).collect();
        let (_t, file) = temp("read", &contents);
        let mut d = Driver::new(&file, false);
        d.mem.write_slice(&[0xaa; 1024], GuestAddress(BUF)).unwrap();
        assert_eq!(d.request(T_IN, 0, 1024, true), (S_OK, 1025));
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..700], &contents[..]);
        assert!(got[700..].iter().all(|&b| b == 0));
        // Sector 2 is past the capacity of a 700-byte read-only device.
        assert_eq!(d.request(T_IN, 1, 1024, true).0, S_IOERR);
        assert_eq!(d.request(T_IN, u64::MAX / 256, 512, true).0, S_IOERR);
        // A read into device-readable memory is malformed.
        assert_eq!(d.request(T_IN, 0, 512, false).0, S_IOERR);
        // Not a whole number of sectors.
        assert_eq!(d.request(T_IN, 0, 100, true).0, S_IOERR);
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let (t, file) = temp("ro", &[7u8; 1024]);
        let mut d = Driver::new(&file, false);
        d.mem.write_slice(&[1u8; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(d.request(T_OUT, 0, 512, false), (S_IOERR, 1));
        assert_eq!(std::fs::read(&t.0).unwrap(), vec![7u8; 1024]);
    }

    #[test]
    fn writable_device_writes_and_extends() {
        let (t, file) = temp("rw", &[7u8; 700]);
        let mut d = Driver::new(&file, true);
        d.mem.write_slice(&[9u8; 1024], GuestAddress(BUF)).unwrap();
        assert_eq!(d.request(T_OUT, 4, 1024, false), (S_OK, 1));
        let after = std::fs::read(&t.0).unwrap();
        assert_eq!(after.len(), 6 * 512);
        assert_eq!(&after[..700], &[7u8; 700][..]);
        assert!(after[700..2048].iter().all(|&b| b == 0));
        assert!(after[2048..].iter().all(|&b| b == 9));
    }

    #[test]
    fn flush_and_get_id() {
        let (_t, file) = temp("id", &[0u8; 512]);
        let mut d = Driver::new(&file, true);
        let hdr = BUF - 0x100;
        let st = BUF - 0x10;
        d.header(hdr, T_FLUSH, 0);
        d.add(&[(hdr, 16, false), (st, 1, true)]);
        d.notify();
        assert_eq!(d.status(st), S_OK);
        assert_eq!(d.request(T_GET_ID, 0, 20, true), (S_OK, 21));
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert!(id.starts_with(b"instar-3\0"));
        assert_eq!(d.request(99, 0, 512, true).0, S_UNSUPP);
    }

    #[test]
    fn hostile_descriptors_fail_cleanly() {
        let (_t, file) = temp("hostile", &[0u8; 4096]);
        let mut d = Driver::new(&file, true);
        // Data buffer outside guest RAM.
        let hdr = BUF - 0x100;
        let st = BUF - 0x10;
        d.header(hdr, T_IN, 0);
        d.add(&[
            (hdr, 16, false),
            (0xffff_f000_0000, 512, true),
            (st, 1, true),
        ]);
        d.notify();
        assert_eq!(d.status(st), S_IOERR);
        // Buffer straddling the end of RAM.
        let end = crate::memory::MIN_RAM - 256;
        d.add(&[(hdr, 16, false), (end, 512, true), (st, 1, true)]);
        d.notify();
        assert_eq!(d.status(st), S_IOERR);
        // Short header: nothing written, used length 0.
        d.add(&[(hdr, 8, false), (st, 1, true)]);
        let i = d.used_idx();
        d.notify();
        assert_eq!(d.used_len(i), 0);
        // Status byte in device-readable memory.
        d.add(&[(hdr, 16, false), (st, 1, false)]);
        let i = d.used_idx();
        d.notify();
        assert_eq!(d.used_len(i), 0);
        assert_eq!(d.used_idx(), i + 1);
    }

    #[test]
    fn every_available_request_is_served_per_notify() {
        let contents: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8).collect();
        let (_t, file) = temp("batch", &contents);
        let mut d = Driver::new(&file, false);
        for k in 0..4u64 {
            let hdr = BUF - 0x1000 + 0x100 * k;
            d.header(hdr, T_IN, 4 * k);
            d.add(&[
                (hdr, 16, false),
                (BUF + 0x1000 * k, 512, true),
                (hdr + 0x40, 1, true),
            ]);
        }
        d.notify();
        assert_eq!(d.used_idx(), 4);
        for k in 0..4u64 {
            let b: u8 = d.mem.read_obj(GuestAddress(BUF + 0x1000 * k)).unwrap();
            assert_eq!(b, 4 * k as u8);
        }
    }

    /// Queue a write of `fill` bytes at `sector`, a flush, and another write, all in one
    /// notify; return the statuses' addresses.
    fn queue_write(d: &mut Driver<'_>, slot: u64, t: u32, sector: u64, fill: u8) -> u64 {
        let hdr = BUF - 0x1000 + 0x100 * slot;
        let st = hdr + 0x40;
        let buf = BUF + 0x1000 * slot;
        d.header(hdr, t, sector);
        d.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        if t == T_FLUSH {
            d.add(&[(hdr, 16, false), (st, 1, true)]);
        } else {
            d.mem.write_slice(&[fill; 512], GuestAddress(buf)).unwrap();
            d.add(&[(hdr, 16, false), (buf, 512, false), (st, 1, true)]);
        }
        st
    }

    #[test]
    fn write_limit_stops_right_after_the_kth_write() {
        // Writes of sectors 0, 1, 2 with a flush between the first two, in one notify.
        let plan = [
            (T_OUT, 0, 1u8),
            (T_FLUSH, 0, 0),
            (T_OUT, 1, 2),
            (T_OUT, 2, 3),
        ];
        for k in 0..=4u64 {
            let (t, file) = temp(&format!("limit{k}"), &[0u8; 2048]);
            let mut d = Driver::new(&file, true);
            d.writes.stop_after = Some(k);
            let st: Vec<u64> = plan
                .iter()
                .enumerate()
                .map(|(i, &(ty, sector, fill))| queue_write(&mut d, i as u64, ty, sector, fill))
                .collect();
            d.notify();
            let written = k.min(3);
            assert_eq!(d.writes.done, written, "k={k}");
            assert_eq!(d.writes.stopped, k <= 3, "k={k}");
            let after = std::fs::read(&t.0).unwrap();
            for s in 0..4u64 {
                let want = if s < written { s as u8 + 1 } else { 0 };
                let got = &after[(s * 512) as usize..][..512];
                assert!(got.iter().all(|&b| b == want), "k={k} sector {s}");
            }
            // The stopping write and everything after it never complete.
            let used = d.used_idx() as u64;
            let completed = match k {
                0 => 0,
                1 => 0,
                2 => 2,
                3 => 3,
                _ => 4,
            };
            assert_eq!(used, completed, "k={k}");
            let last_status: u8 = d.status(st[3]);
            assert_eq!(last_status, if k > 3 { S_OK } else { 0xff }, "k={k}");
        }
    }

    #[test]
    fn recording_lists_completed_writes_and_flushes_in_order() {
        let (_t, file) = temp("record", &[0u8; 2048]);
        let mut d = Driver::new(&file, true);
        d.writes.log = Some(Vec::new());
        // Refused (misaligned): not recorded.
        assert_eq!(d.request(T_OUT, 0, 100, false).0, S_IOERR);
        for (i, &(t, sector)) in [(T_OUT, 2), (T_FLUSH, 0), (T_OUT, 0), (T_OUT, 3)]
            .iter()
            .enumerate()
        {
            queue_write(&mut d, i as u64, t, sector, 7);
        }
        d.notify();
        // The test driver's device is index 3.
        let w = |offset| BlockOp::Write {
            device: 3,
            offset,
            len: 512,
        };
        assert_eq!(
            d.writes.log.as_deref(),
            Some(&[w(1024), BlockOp::Flush { device: 3 }, w(0), w(1536)][..])
        );
    }

    #[test]
    fn the_record_grows_without_realloc_and_keeps_every_op() {
        let mut w = WriteCount {
            log: Some(Vec::new()),
            ..WriteCount::default()
        };
        for i in 0..1000u64 {
            w.record(BlockOp::Write {
                device: 0,
                offset: i,
                len: 512,
            });
        }
        let log = w.log.unwrap();
        assert_eq!(log.len(), 1000);
        assert!(log.iter().enumerate().all(|(i, op)| matches!(
            op,
            BlockOp::Write { offset, .. } if *offset == i as u64
        )));
        // Without a log nothing is kept.
        let mut off = WriteCount::default();
        off.record(BlockOp::Flush { device: 0 });
        assert!(off.log.is_none());
    }

    #[test]
    fn refused_and_failed_writes_and_flushes_do_not_count() {
        let (t, file) = temp("nocount", &[5u8; 1024]);
        let mut d = Driver::new(&file, false);
        d.writes.stop_after = Some(1);
        d.mem.write_slice(&[1u8; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(d.request(T_OUT, 0, 512, false), (S_IOERR, 1));
        assert_eq!(d.writes.done, 0);
        assert!(!d.writes.stopped);
        assert_eq!(std::fs::read(&t.0).unwrap(), vec![5u8; 1024]);

        let mut d = Driver::new(&file, true);
        d.writes.stop_after = Some(1);
        // Misaligned, and beyond the capacity: refused, not counted.
        assert_eq!(d.request(T_OUT, 0, 100, false).0, S_IOERR);
        assert_eq!(d.request(T_OUT, u64::MAX / 512, 512, false).0, S_IOERR);
        let st = queue_write(&mut d, 0, T_FLUSH, 0, 0);
        d.notify();
        assert_eq!(d.status(st), S_OK);
        assert_eq!((d.writes.done, d.writes.stopped), (0, false));
        // Reads neither.
        assert_eq!(d.request(T_IN, 0, 512, true).0, S_OK);
        assert_eq!((d.writes.done, d.writes.stopped), (0, false));
    }

    #[test]
    fn without_a_limit_writes_are_only_counted() {
        let (_t, file) = temp("count", &[0u8; 512]);
        let mut d = Driver::new(&file, true);
        for _ in 0..5 {
            assert_eq!(d.request(T_OUT, 0, 512, false).0, S_OK);
        }
        assert_eq!((d.writes.done, d.writes.stopped), (5, false));
    }

    #[test]
    fn large_requests_are_split_with_a_worker() {
        use std::os::fd::AsRawFd;
        // 1 MiB + 300 bytes: the read covers 2 sectors more than 1 MiB, so the end of
        // the file falls in the worker's part.
        let contents: Vec<u8> = (0..(1 << 20) + 300u32).map(|i| (i % 253) as u8).collect();
        let (_t, file) = temp("large", &contents);
        let program = crate::seccomp::build_io_worker(&[file.as_raw_fd()]).unwrap();
        let pool = IoPool::start(crate::io_pool::WORKERS, &program).unwrap();
        let mut d = Driver::with_pool(&file, false, pool);
        let total = (1u32 << 20) + 512;
        let first = 600 << 10;
        d.mem
            .write_slice(&vec![0xaa; total as usize], GuestAddress(BUF))
            .unwrap();
        let hdr = BUF - 0x100;
        let st = BUF - 0x10;
        d.header(hdr, T_IN, 0);
        d.add(&[
            (hdr, 16, false),
            (BUF, first, true),
            (BUF + first as u64, total - first, true),
            (st, 1, true),
        ]);
        d.notify();
        assert_eq!(d.used_idx(), 1);
        assert_eq!((d.status(st), d.used_len(0)), (S_OK, total + 1));
        let mut got = vec![0u8; total as usize];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..contents.len()], &contents[..]);
        assert!(got[contents.len()..].iter().all(|&b| b == 0));

        // A large write on a writable device with a worker: one request, counted once.
        let (t, file) = temp("large-w", &[0u8; 4096]);
        let program = crate::seccomp::build_io_worker(&[file.as_raw_fd()]).unwrap();
        let pool = IoPool::start(crate::io_pool::WORKERS, &program).unwrap();
        let mut d = Driver::with_pool(&file, true, pool);
        d.writes.stop_after = Some(1);
        d.mem
            .write_slice(&contents[..1 << 20], GuestAddress(BUF))
            .unwrap();
        d.header(hdr, T_OUT, 0);
        d.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        d.add(&[(hdr, 16, false), (BUF, 1 << 20, false), (st, 1, true)]);
        d.notify();
        // Stopped right after the write: it never completes.
        assert_eq!((d.used_idx(), d.status(st)), (0, 0xff));
        assert_eq!((d.writes.done, d.writes.stopped), (1, true));
        assert_eq!(std::fs::read(&t.0).unwrap(), &contents[..1 << 20]);
    }

    #[test]
    fn misprogrammed_queue_is_ignored() {
        let (_t, file) = temp("badq", &[0u8; 512]);
        let mut d = Driver::new(&file, false);
        d.w(REG_STATUS, 0);
        d.w(REG_QUEUE_DESC_LOW, 0xffff_0000);
        d.w(REG_QUEUE_DESC_HIGH, 0xffff);
        d.w(REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        d.w(REG_QUEUE_DEVICE_LOW, USED as u32);
        d.w(REG_QUEUE_READY, 1);
        d.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        d.notify();
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn phase_and_end_bound_writes() {
        let (t, file) = temp("phase", &[7u8; 1024]);
        let mut d = Driver::new(&file, true);
        d.dev.write_end = 0;
        d.mem.write_slice(&[9u8; 512], GuestAddress(BUF)).unwrap();
        // Before the write phase: refused.
        assert_eq!(d.request(T_OUT, 0, 512, false).0, S_IOERR);
        // Declared end 1000 bytes: sector 1 (ending at 1024) is allowed, sector 2 not.
        d.dev.start_writes(1000);
        assert_eq!(d.request(T_OUT, 2, 512, false).0, S_IOERR);
        assert_eq!(d.request(T_OUT, 1, 512, false).0, S_OK);
        // A declaration past the host's bound (1 MiB here) is cut to it.
        d.dev.start_writes(u64::MAX);
        assert_eq!(d.request(T_OUT, 2048, 512, false).0, S_IOERR);
        assert_eq!(d.request(T_OUT, 2047, 512, false).0, S_OK);
        assert_eq!(std::fs::metadata(&t.0).unwrap().len(), 1 << 20);
        assert_eq!(d.writes.done, 2);
    }

    #[test]
    fn status_at_the_top_of_the_address_space_fails_cleanly() {
        let (_t, file) = temp("top", &[0u8; 512]);
        let mut d = Driver::new(&file, false);
        let hdr = BUF - 0x100;
        d.header(hdr, T_IN, 0);
        let i = d.used_idx();
        d.add(&[(hdr, 16, false), (u64::MAX, 2, true)]);
        d.notify();
        assert_eq!((d.used_idx(), d.used_len(i)), (i + 1, 0));
        d.add(&[(hdr, 16, false), (BUF, 512, true), (u64::MAX - 1, 2, true)]);
        d.notify();
        assert_eq!((d.used_idx(), d.used_len(i + 1)), (i + 2, 0));
    }

    #[test]
    fn avail_jumps_past_the_queue_end_the_vm() {
        let (_t, file) = temp("jump", &[0u8; 512]);
        let mut d = Driver::new(&file, false);
        d.mem.write_obj(257u16, GuestAddress(AVAIL + 2)).unwrap();
        let err = d.try_w(REG_QUEUE_NOTIFY, 0).unwrap_err();
        assert!(err.contains("257 requests available at once"), "{err}");
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn a_request_overwriting_the_avail_index_cannot_extend_its_notify() {
        // A read whose data lands on avail->idx, turning 1 available request into many:
        // the notify still serves the one it saw.
        let mut contents = vec![0u8; 512];
        contents[2..4].copy_from_slice(&16u16.to_le_bytes());
        let (_t, file) = temp("overlap", &contents);
        let mut d = Driver::new(&file, false);
        let hdr = BUF - 0x100;
        let st = BUF - 0x10;
        d.header(hdr, T_IN, 0);
        d.add(&[(hdr, 16, false), (AVAIL, 512, true), (st, 1, true)]);
        d.notify();
        assert_eq!(d.status(st), S_OK);
        assert_eq!(d.used_idx(), 1);
        let idx: u16 = d.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(idx, 16, "the read did land on the ring");
    }

    #[test]
    fn the_queue_layout_is_frozen_while_ready() {
        let (_t, file) = temp("frozen", &[3u8; 512]);
        let mut d = Driver::new(&file, false);
        d.w(REG_QUEUE_DESC_LOW, 0x5000);
        d.w(REG_QUEUE_DEVICE_LOW, 0x7000);
        d.w(REG_QUEUE_NUM, 256);
        assert_eq!(d.dev.queue.desc_table(), DESC);
        assert_eq!(d.dev.queue.used_ring(), USED);
        assert_eq!(d.dev.queue.size(), QSIZE);
        assert_eq!(d.request(T_IN, 0, 512, true).0, S_OK);
    }

    #[test]
    fn a_notify_moves_at_most_its_byte_budget() {
        let (_t, file) = temp("budget", &vec![1u8; 16 << 20]);
        let mut d = Driver::new(&file, false);
        // 65 requests of 16 MiB (two 8 MiB segments over the same buffer), all from one
        // chain: the 65th would take the notify past 1 GiB.
        let hdr = BUF - 0x100;
        let st = BUF - 0x10;
        d.header(hdr, T_IN, 0);
        d.add(&[
            (hdr, 16, false),
            (BUF, 8 << 20, true),
            (BUF, 8 << 20, true),
            (st, 1, true),
        ]);
        for k in 1..65u64 {
            d.mem
                .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * k))
                .unwrap();
        }
        d.mem.write_obj(65u16, GuestAddress(AVAIL + 2)).unwrap();
        d.notify();
        assert_eq!(d.used_idx(), 65);
        for k in 0..64 {
            assert_eq!(d.used_len(k), (16 << 20) + 1, "request {k}");
        }
        assert_eq!((d.used_len(64), d.status(st)), (1, S_IOERR));
    }
}
