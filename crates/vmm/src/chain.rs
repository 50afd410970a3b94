//! Reading one descriptor chain of a split virtqueue, with hard bounds.
//!
//! virtio-queue's own chain iterator follows a chain for up to the queue size (or
//! 65,535 entries of an indirect table) and ends it silently on a malformed entry, so
//! a caller collecting it cannot tell a short chain from a broken one. This walker
//! reads at most [`MAX_CHAIN`] descriptors into a buffer allocated once per device,
//! and fails on anything a driver must not build:
//! - more than [`MAX_CHAIN`] descriptors (the advertised `seg_max` data segments, the
//!   header and the status byte), which also ends every loop;
//! - an indirect table longer than [`MAX_CHAIN`] entries (refused before it is read),
//!   empty, or not a whole number of descriptors;
//! - an indirect descriptor inside an indirect table, or with `NEXT` set;
//! - an index outside the table, or a descriptor outside guest memory.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::virtio_blk::SEG_MAX;

/// Most descriptors in one request: `SEG_MAX` data segments, the header, the status.
pub const MAX_CHAIN: usize = SEG_MAX as usize + 2;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Bytes per descriptor.
const DESC_SIZE: u64 = 16;

/// One buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the device writes into guest memory).
    pub write_only: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// More than [`MAX_CHAIN`] descriptors, or a loop.
    TooLong,
    /// A malformed or nested indirect descriptor, or an oversized indirect table.
    BadIndirect,
    /// A `next` or head index outside its table.
    BadIndex,
    /// A descriptor outside guest memory.
    Unreadable,
}

/// Read the chain starting at `head` of the descriptor table at `table` (`size`
/// entries) into `out`, which is cleared first and never grows past [`MAX_CHAIN`].
pub fn walk(
    mem: &GuestMemory,
    table: GuestAddress,
    size: u16,
    head: u16,
    out: &mut Vec<Seg>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = table;
    let mut size = u32::from(size);
    let mut index = head;
    let mut indirect = false;
    // Every round either stores a descriptor (at most MAX_CHAIN) or enters the one
    // indirect table a chain may have, so the loop is bounded.
    loop {
        if u32::from(index) >= size {
            return Err(ChainError::BadIndex);
        }
        let at = table
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable)?;
        let raw: [u8; 16] = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| ChainError::Unreadable)?;
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & F_INDIRECT != 0 {
            if indirect || flags & F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > MAX_CHAIN as u64 {
                return Err(ChainError::BadIndirect);
            }
            table = GuestAddress(addr);
            size = entries as u32;
            index = 0;
            indirect = true;
            continue;
        }
        if out.len() >= MAX_CHAIN {
            return Err(ChainError::TooLong);
        }
        out.push(Seg {
            addr: GuestAddress(addr),
            len,
            write_only: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = 0x10000;
    const IND: u64 = 0x40000;

    fn put(mem: &GuestMemory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn mem() -> GuestMemory {
        crate::memory::create(crate::memory::MIN_RAM).unwrap()
    }

    fn walk_head(mem: &GuestMemory, head: u16) -> Result<Vec<Seg>, ChainError> {
        let mut out = Vec::with_capacity(MAX_CHAIN);
        let capacity = out.capacity();
        let result = walk(mem, GuestAddress(TABLE), 256, head, &mut out);
        assert_eq!(out.capacity(), capacity, "the buffer never grows");
        result.map(|()| out)
    }

    #[test]
    fn direct_and_indirect_chains() {
        let m = mem();
        put(&m, TABLE, 0x1000, 16, F_NEXT, 1);
        put(&m, TABLE + 16, 0x2000, 512, F_NEXT | F_WRITE, 2);
        put(&m, TABLE + 32, 0x3000, 1, F_WRITE, 0);
        let c = walk_head(&m, 0).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].addr, GuestAddress(0x3000));
        assert!(c[2].write_only && !c[0].write_only);

        put(&m, TABLE + 48, IND, 3 * 16, F_INDIRECT, 0);
        put(&m, IND, 0x1000, 16, F_NEXT, 1);
        put(&m, IND + 16, 0x2000, 512, F_NEXT | F_WRITE, 2);
        put(&m, IND + 32, 0x3000, 1, F_WRITE, 0);
        assert_eq!(walk_head(&m, 3).unwrap(), c);
    }

    #[test]
    fn loops_and_long_chains_are_refused() {
        let m = mem();
        // 0 -> 1 -> 0 -> ...
        put(&m, TABLE, 0x1000, 16, F_NEXT, 1);
        put(&m, TABLE + 16, 0x2000, 16, F_NEXT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::TooLong));
        // Exactly MAX_CHAIN is fine, one more is not.
        for i in 0..MAX_CHAIN as u64 + 1 {
            let last = i == MAX_CHAIN as u64 - 1;
            let flags = if last { 0 } else { F_NEXT };
            put(&m, TABLE + 16 * (10 + i), 0x1000, 16, flags, 11 + i as u16);
        }
        assert_eq!(walk_head(&m, 10).unwrap().len(), MAX_CHAIN);
        put(
            &m,
            TABLE + 16 * (9 + MAX_CHAIN as u64),
            0x1000,
            16,
            F_NEXT,
            0,
        );
        assert_eq!(walk_head(&m, 10), Err(ChainError::TooLong));
    }

    #[test]
    fn bad_indirect_tables_are_refused() {
        let m = mem();
        // Longer than a request can be: refused without reading it.
        put(&m, TABLE, IND, (MAX_CHAIN as u32 + 1) * 16, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        put(&m, TABLE, IND, 65_535 * 16, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        // Not a whole number of descriptors, empty, with NEXT.
        put(&m, TABLE, IND, 24, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        put(&m, TABLE, IND, 0, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        put(&m, TABLE, IND, 32, F_INDIRECT | F_NEXT, 1);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        // Nested: an indirect entry inside the table.
        put(&m, TABLE, IND, 32, F_INDIRECT, 0);
        put(&m, IND, 0x1000, 16, F_NEXT, 1);
        put(&m, IND + 16, IND, 32, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndirect));
        // A table looping on itself ends at MAX_CHAIN.
        put(&m, IND + 16, 0x1000, 16, F_NEXT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::TooLong));
        // Next index outside the table.
        put(&m, IND + 16, 0x1000, 16, F_NEXT, 2);
        assert_eq!(walk_head(&m, 0), Err(ChainError::BadIndex));
    }

    #[test]
    fn descriptors_outside_memory_are_refused() {
        let m = mem();
        let mut out = Vec::with_capacity(MAX_CHAIN);
        assert_eq!(
            walk(&m, GuestAddress(u64::MAX - 8), 256, 0, &mut out),
            Err(ChainError::Unreadable)
        );
        assert_eq!(
            walk(&m, GuestAddress(u64::MAX - 15), 256, 255, &mut out),
            Err(ChainError::Unreadable)
        );
        put(&m, TABLE, u64::MAX - 15, 32, F_INDIRECT, 0);
        assert_eq!(walk_head(&m, 0), Err(ChainError::Unreadable));
        assert_eq!(walk_head(&m, 256), Err(ChainError::BadIndex));
    }
}
