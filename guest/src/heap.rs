//! The global allocator (all of guest RAM above the image) and the virtio DMA glue.
//!
//! Guest RAM is identity-mapped, so a pointer is its own guest-physical address: DMA
//! buffers come straight from the heap and sharing a buffer is a no-op.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::LockedHeap;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __heap_start: u8;
}

/// Give the allocator `[__heap_start, ram_end)`. Untouched pages cost the host nothing.
pub fn init(ram_end: u64) {
    // Only the address of the linker symbol is taken, never its value.
    let start = core::ptr::addr_of!(__heap_start) as usize;
    let end = ram_end as usize;
    if end <= start {
        panic!("guest RAM ends at {end:#x}, below the heap start {start:#x}");
    }
    // SAFETY: [start, end) is guest RAM past the image and its stack, used by nothing
    // else, and init runs once before any allocation.
    unsafe { HEAP.lock().init(start as *mut u8, end - start) }
}

/// DMA through the heap.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned heap memory owned by the caller until
// dma_dealloc; identity mapping makes the physical address equal the pointer.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = match Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) {
            Ok(l) => l,
            Err(_) => panic!("bad DMA allocation of {pages} pages"),
        };
        // SAFETY: the layout has a non-zero size (virtio-drivers never asks for 0 pages).
        let ptr = unsafe { HEAP.alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => panic!("out of guest memory for DMA ({pages} pages)"),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        if let Ok(layout) = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) {
            // SAFETY: the caller passes back what dma_alloc returned for `pages`.
            unsafe { HEAP.dealloc(vaddr.as_ptr(), layout) }
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        match NonNull::new(paddr as *mut u8) {
            Some(p) => p,
            None => panic!("null MMIO address"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
