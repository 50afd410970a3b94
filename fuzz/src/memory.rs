//! A counting global allocator: per-thread live bytes and peak, so that a campaign can
//! check each execution's memory against a budget, and a hard cap that turns a runaway
//! allocation into an allocation failure instead of exhausting the machine.
//!
//! Binaries opt in with `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Live bytes one thread may hold; past it allocations fail (the process aborts with
/// Rust's "memory allocation failed" message, which a campaign reports).
pub const HARD_CAP: usize = 1 << 30;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

pub struct CountingAlloc;

fn add(size: usize) -> bool {
    LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        if now > HARD_CAP {
            return false;
        }
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        true
    })
    .unwrap_or(true)
}

fn sub(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every call forwards to `System` with the caller's layout; the counters are
// plain thread-local cells that never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        // SAFETY: `ptr` came from `System` with this layout (every allocation does).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !add(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > layout.size() {
                sub(new_size - layout.size());
            }
        } else if new_size < layout.size() {
            sub(layout.size() - new_size);
        }
        p
    }
}

/// Start measuring: the peak restarts from the bytes live now, which are returned.
pub fn start() -> usize {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    live
}

/// Highest live byte count since [`start`].
pub fn peak() -> usize {
    PEAK.with(Cell::get)
}
