//! Guest-physical memory map. Guest virtual addresses are identical (identity paging).
//!
//! ```text
//! 0x0000_0000  page 0, never mapped (null pointer dereferences fault)
//! 0x0000_1000  GDT                               (written by the VMM)
//! 0x0000_2000  page tables, up to 0x8000          (written by the VMM)
//! 0x0000_8000  request area   (REQUEST_SIZE)      host -> guest, before the vCPU starts
//! 0x0000_C000  response area  (RESPONSE_SIZE)     guest -> host, read after a doorbell
//! 0x0010_0000  guest ELF (PT_LOAD segments; .bss holds the heap and stack)
//! RAM end      default DEFAULT_RAM_SIZE, lazily backed
//! 0xC000_0000  doorbell (MMIO, unbacked: every write is a VM exit)
//! 0xD000_0000  virtio-mmio device i at VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE
//! ```

/// Guest page size used for the fixed areas.
pub const PAGE_SIZE: u64 = 0x1000;

/// Global descriptor table, written by the VMM.
pub const GDT_ADDR: u64 = 0x1000;
/// First page-table page (PML4); the VMM may use pages up to [`PAGE_TABLES_END`].
pub const PAGE_TABLES_ADDR: u64 = 0x2000;
/// End (exclusive) of the page-table region.
pub const PAGE_TABLES_END: u64 = 0x8000;

/// Host-to-guest request area: `u32` little-endian length, then the encoded [`crate::Request`].
pub const REQUEST_ADDR: u64 = 0x8000;
/// Size of the request area in bytes, length prefix included.
pub const REQUEST_SIZE: usize = 0x4000;

/// Guest-to-host response area: `u32` little-endian length, then the encoded
/// [`crate::Response`] (after [`DOORBELL_DONE`]) or UTF-8 text (after [`DOORBELL_PANIC`]).
pub const RESPONSE_ADDR: u64 = 0xC000;
/// Size of the response area in bytes, length prefix included.
pub const RESPONSE_SIZE: usize = 0x4000;

/// Where the guest ELF must be linked; the VMM refuses segments below this.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

/// Default guest RAM (lazily backed by the host, so untouched pages cost nothing).
pub const DEFAULT_RAM_SIZE: u64 = 256 << 20;

/// The doorbell: the guest writes one `u64` here. The high 32 bits are the code
/// (`DOORBELL_*`), the low 32 bits an argument.
pub const DOORBELL_ADDR: u64 = 0xC000_0000;

/// The response area holds a [`crate::Response`]; the guest then halts.
pub const DOORBELL_DONE: u32 = 1;
/// The response area holds a UTF-8 panic message; the guest then halts.
pub const DOORBELL_PANIC: u32 = 2;
/// Progress report (safe mode): the argument is how many copy-loop steps so far were not
/// skipped. Each adds QEMU's fixed step (`100 / (size / min(size, 2 MiB))`), which the host
/// accumulates in `f32` exactly as qemu-img does, so that the printed lines match.
pub const DOORBELL_PROGRESS: u32 = 3;
/// The guest has finished all its checks and is about to write to a read-write device.
/// The argument is the low 32 bits of the declared write end: the offset no write of
/// the plan goes past (the high 32 bits come first, with [`DOORBELL_WRITE_END_HIGH`]).
/// The host refuses every write before this doorbell and every write past the declared
/// end (and past its own bound, which a guest cannot raise). Rung at most once.
pub const DOORBELL_WRITE_PHASE: u32 = 4;
/// The high 32 bits of the write end that the next [`DOORBELL_WRITE_PHASE`] declares.
pub const DOORBELL_WRITE_END_HIGH: u32 = 5;

/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Distance between two virtio-mmio devices.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Most devices one VM can have (overlay + old chain + new chain).
pub const MAX_DEVICES: usize = 64;

/// Guest-physical address of virtio-mmio device `index`.
pub const fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE
}

/// Encode a doorbell value.
pub const fn doorbell(code: u32, arg: u32) -> u64 {
    ((code as u64) << 32) | arg as u64
}
