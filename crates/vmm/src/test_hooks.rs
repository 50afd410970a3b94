//! Test-only hooks (feature `test-hooks`): make the next pass through a site of a
//! confined thread panic, to show that such a panic ends as an error, not as SIGSYS.
//! The hook is process-wide: tests arm it in a child process of their own.

use std::sync::atomic::{AtomicU8, Ordering};

/// Where a panic can be provoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Site {
    /// The vCPU thread, when it serves a PROGRESS doorbell.
    Vcpu = 1,
    /// An I/O worker, when it takes a job.
    IoWorker = 2,
    /// The teardown thread, when it drops a finished VM.
    Teardown = 3,
}

static ARMED: AtomicU8 = AtomicU8::new(0);

/// Panic the next time `site` is reached (once).
pub fn arm(site: Site) {
    ARMED.store(site as u8, Ordering::SeqCst);
}

/// Called at each site: panics if it is armed.
pub(crate) fn reached(site: Site) {
    if ARMED
        .compare_exchange(site as u8, 0, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        panic!("test hook: provoked panic at {site:?} \x1b[31m");
    }
}
