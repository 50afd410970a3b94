//! The C library symbols the compressors in `csrc/` (zlib, zstd) call besides
//! `memcpy`/`memmove`/`memset`/`memcmp` (in `boot.rs`): `malloc`, `calloc` and `free`,
//! served from the Rust heap.
//!
//! C's `free` gets no size, so every block starts with a 16-byte header holding the
//! whole allocation's size; 16 is also the alignment C expects of `malloc` on x86-64.

use alloc::alloc::{alloc, alloc_zeroed, dealloc, Layout};

const HEADER: usize = 16;
const ALIGN: usize = 16;

fn layout_for(size: usize) -> Option<Layout> {
    let total = size.checked_add(HEADER)?;
    Layout::from_size_align(total, ALIGN).ok()
}

/// Allocate `size` bytes (zeroed when `zeroed`); null when the heap is exhausted or
/// the size overflows, as C's allocators report failure.
fn allocate(size: usize, zeroed: bool) -> *mut u8 {
    let Some(layout) = layout_for(size) else {
        return core::ptr::null_mut();
    };
    // SAFETY: the layout is at least HEADER bytes, never zero-sized.
    let base = unsafe {
        if zeroed {
            alloc_zeroed(layout)
        } else {
            alloc(layout)
        }
    };
    if base.is_null() {
        return base;
    }
    // SAFETY: `base` is valid for `layout.size()` >= HEADER bytes and 16-aligned, so
    // the header write is in bounds and aligned, and `base + HEADER` is still inside.
    unsafe {
        (base as *mut usize).write(layout.size());
        base.add(HEADER)
    }
}

/// # Safety
/// Standard C `malloc` contract.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut u8 {
    allocate(size, false)
}

/// # Safety
/// Standard C `calloc` contract.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut u8 {
    match n.checked_mul(size) {
        Some(total) => allocate(total, true),
        None => core::ptr::null_mut(),
    }
}

/// # Safety
/// Standard C `free` contract: `p` is null or came from `malloc`/`calloc` above.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut u8) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from `allocate`, so the header sits HEADER bytes before it and
    // holds the size of the allocation made with ALIGN.
    unsafe {
        let base = p.sub(HEADER);
        let total = (base as *const usize).read();
        dealloc(base, Layout::from_size_align_unchecked(total, ALIGN));
    }
}
