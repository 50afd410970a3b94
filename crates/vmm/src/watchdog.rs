//! Ends a guest that makes no progress.
//!
//! A per-thread POSIX timer (`timer_create` with `SIGEV_THREAD_ID`) sends SIGALRM to the
//! vCPU thread itself; the handler, installed without `SA_RESTART`, stores 1 into that
//! thread's `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` now (the signal
//! interrupted it) or at its next entry (the signal landed between two runs).
//! A process-wide `setitimer` would not do: its signal goes to any thread of the
//! process, and several sandboxes may run at once (the test harness runs tests in
//! parallel). The timer is re-armed before every `KVM_RUN`, so the limit is the time
//! the guest runs without a VM exit, and time spent on host-side I/O does not count.

use std::cell::Cell;
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::Duration;

use kvm_bindings::kvm_run;

use crate::Error;

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs (null when none).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
    /// Set by the handler when the timer fired on this thread.
    static FIRED: Cell<bool> = const { Cell::new(false) };
}

static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_alarm(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only our timers count; a stray SIGALRM (kill -ALRM) is ignored.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    if info.is_null() || unsafe { (*info).si_code } != libc::SI_TIMER {
        return;
    }
    // Thread-locals with const initialisers and no destructor are plain TLS accesses,
    // safe in a signal handler.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        FIRED.with(|f| f.set(true));
        // SAFETY: the pointer is this thread's mapped kvm_run, registered by Watchdog
        // and cleared before it is unmapped.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

fn install_handler() -> Result<(), Error> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only touches thread-locals
        // and the kvm_run mapping.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_alarm as *const () as usize;
            // No SA_RESTART: KVM_RUN must return EINTR.
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGALRM, &sa, ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::SeqCst);
            }
        }
    });
    if INSTALLED.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(Error::Setup {
            what: "installing the watchdog signal handler",
            source: io::Error::other("sigaction failed"),
        })
    }
}

/// The watchdog of the vCPU running on the current thread.
pub struct Watchdog {
    timer: libc::timer_t,
    limit: libc::itimerspec,
}

impl Watchdog {
    /// Create the timer for the current thread and register `run` (this thread's vCPU).
    pub fn new(run: *mut kvm_run, limit: Duration) -> Result<Watchdog, Error> {
        install_handler()?;
        // Unblock SIGALRM on this thread in case the caller blocked it.
        // SAFETY: plain signal-mask manipulation of the current thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGALRM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
        }
        // SAFETY: a zeroed sigevent is valid; gettid has no preconditions.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGALRM;
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = ptr::null_mut();
        // SAFETY: valid sigevent and out-pointer.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(Error::setup("creating the watchdog timer")(
                io::Error::last_os_error(),
            ));
        }
        KVM_RUN.with(|c| c.set(run));
        FIRED.with(|f| f.set(false));
        let limit = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: limit.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: limit.subsec_nanos().max(1) as libc::c_long,
            },
        };
        Ok(Watchdog { timer, limit })
    }

    /// Restart the countdown. Call right before `KVM_RUN`, then clear `immediate_exit`:
    /// a signal after this call cannot come before the full limit has passed.
    pub fn arm(&self) {
        // SAFETY: the timer was created by `new` and not yet deleted.
        unsafe { libc::timer_settime(self.timer, 0, &self.limit, ptr::null_mut()) };
        FIRED.with(|f| f.set(false));
    }

    /// Whether the timer has fired since `new`.
    pub fn fired(&self) -> bool {
        FIRED.with(Cell::get)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(ptr::null_mut()));
        // SAFETY: the timer was created by `new`; deleting it also disarms it.
        unsafe { libc::timer_delete(self.timer) };
    }
}
