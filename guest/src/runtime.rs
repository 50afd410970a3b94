//! The guest's side of the control channel: request/response areas, doorbells, panics.

use core::fmt::Write;
use instar_abi::layout::{
    doorbell, DOORBELL_ADDR, DOORBELL_DONE, DOORBELL_PANIC, DOORBELL_WRITE_END_HIGH,
    DOORBELL_WRITE_PHASE, REQUEST_ADDR, REQUEST_SIZE, RESPONSE_ADDR, RESPONSE_SIZE,
};

/// Ring the doorbell: one 8-byte MMIO write, which the VMM sees as a VM exit.
pub fn ring(code: u32, arg: u32) {
    // SAFETY: DOORBELL_ADDR is identity-mapped MMIO that only the VMM observes.
    unsafe { core::ptr::write_volatile(DOORBELL_ADDR as *mut u64, doorbell(code, arg)) }
}

/// Declare the write phase and its end: the host refuses writes before it, and past
/// `end`.
pub fn write_phase(end: u64) {
    ring(DOORBELL_WRITE_END_HIGH, (end >> 32) as u32);
    ring(DOORBELL_WRITE_PHASE, end as u32);
}

/// The request area the VMM filled before starting the vCPU.
pub fn request_area() -> &'static [u8] {
    // SAFETY: the request area is identity-mapped guest RAM that nothing writes while the
    // guest runs.
    unsafe { core::slice::from_raw_parts(REQUEST_ADDR as *const u8, REQUEST_SIZE) }
}

/// The response area. Only one caller at a time (the final answer or the panic handler).
fn response_area() -> &'static mut [u8] {
    // SAFETY: the response area is identity-mapped guest RAM used by nothing else; the
    // guest is single-threaded and writes it only right before its final doorbell.
    unsafe { core::slice::from_raw_parts_mut(RESPONSE_ADDR as *mut u8, RESPONSE_SIZE) }
}

/// Stop forever. `hlt` is privileged at CPL3; the VMM ends the VM on DONE/PANIC.
pub fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Send the final response and stop.
pub fn finish(response: &instar_abi::Response) -> ! {
    if instar_abi::encode(response, response_area()).is_err() {
        // Only a response with an enormous message could fail to fit.
        panic!("response does not fit the response area");
    }
    ring(DOORBELL_DONE, 0);
    halt()
}

/// Formats into the response area after the length prefix, truncating at its end.
struct AreaWriter {
    area: &'static mut [u8],
    used: usize,
}

impl Write for AreaWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.area.len().saturating_sub(4 + self.used);
        let n = s.len().min(room);
        let start = 4 + self.used;
        self.area[start..start + n].copy_from_slice(&s.as_bytes()[..n]);
        self.used += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // No allocation here: the heap may be what failed.
    let mut w = AreaWriter {
        area: response_area(),
        used: 0,
    };
    let _ = write!(w, "{}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(w, " at {}:{}", loc.file(), loc.line());
    }
    let used = w.used as u32;
    w.area[..4].copy_from_slice(&used.to_le_bytes());
    ring(DOORBELL_PANIC, 0);
    halt()
}
