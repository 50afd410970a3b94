//! Ends a guest that makes no progress.
//!
//! A per-thread POSIX timer (`timer_create` with `SIGEV_THREAD_ID`) sends SIGALRM to the
//! vCPU thread itself every [`TICKS`]th of the limit. It is armed once: the run loop
//! only counts VM exits and says whether the guest is running, with plain stores to
//! thread-local atomics, so a VM exit costs no system call. The handler, installed
//! without `SA_RESTART`, compares the exit count with the one it saw at the previous
//! tick; after [`TICKS`] ticks in a row with the guest running and no exit, it stores 1
//! into the thread's `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` now (the
//! signal interrupted it) or at its next entry.
//!
//! A tick counts only if the guest was running at it and at the tick before, with no
//! exit in between, so a guest is stopped only after it ran for the whole limit without
//! a VM exit, and at most one tick later (limit × (1 + 1/[`TICKS`]), plus signal
//! latency). Time the host spends serving an exit never counts.
//!
//! A second, one-shot timer on the same thread ends the VM at its total deadline
//! ([`crate::Config::deadline`]), however the guest behaves: the handler sets a
//! thread-local flag and `immediate_exit`, so the next `KVM_RUN` returns `EINTR`, and a
//! device serving a notify stops between requests ([`deadline_passed`]). It catches
//! what the no-exit watchdog cannot: a guest that keeps exiting (doorbell floods,
//! endless register reads or requests).
//!
//! A process-wide `setitimer` would not do: its signal goes to any thread of the
//! process, and several sandboxes may run at once (the test harness runs tests in
//! parallel).

use std::cell::Cell;
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

use kvm_bindings::kvm_run;

use crate::Error;

/// Ticks per watchdog limit.
pub const TICKS: u32 = 4;
/// `SEEN` when the last tick found the guest not running.
const NOT_RUNNING: u64 = u64::MAX;
/// `sigev_value` of the deadline timer (the tick timer has 0).
const DEADLINE_TAG: usize = 1;

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs (null when none).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
    /// Set by the handler when it stopped the guest.
    static FIRED: Cell<bool> = const { Cell::new(false) };
    /// Set by the handler when the deadline passed.
    static DEADLINE: Cell<bool> = const { Cell::new(false) };
    /// VM exits so far (the run loop writes, the handler reads).
    static EXITS: AtomicU64 = const { AtomicU64::new(0) };
    /// Whether the thread is in (or about to enter) `KVM_RUN`.
    static IN_GUEST: AtomicBool = const { AtomicBool::new(false) };
    /// The handler's own state: `EXITS` at the previous tick (or `NOT_RUNNING`), and
    /// the ticks in a row without an exit.
    static SEEN: Cell<u64> = const { Cell::new(NOT_RUNNING) };
    static STALE: Cell<u32> = const { Cell::new(0) };
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
    // safe in a signal handler; the atomics are written by the interrupted code of
    // this same thread.
    let run = KVM_RUN.with(Cell::get);
    if run.is_null() {
        return;
    }
    // SAFETY: as above; si_value is set for SI_TIMER signals.
    if unsafe { (*info).si_value() }.sival_ptr as usize == DEADLINE_TAG {
        DEADLINE.with(|f| f.set(true));
        // SAFETY: as below.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
        return;
    }
    let exits = EXITS.with(|e| e.load(Ordering::Relaxed));
    if !IN_GUEST.with(|g| g.load(Ordering::Relaxed)) {
        SEEN.with(|s| s.set(NOT_RUNNING));
        STALE.with(|s| s.set(0));
        return;
    }
    if SEEN.with(Cell::get) != exits {
        SEEN.with(|s| s.set(exits));
        STALE.with(|s| s.set(0));
        return;
    }
    let stale = STALE.with(Cell::get).saturating_add(1);
    STALE.with(|s| s.set(stale));
    if stale >= TICKS {
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

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// Whether the deadline of the VM running on this thread has passed (false on any
/// other thread).
pub fn deadline_passed() -> bool {
    DEADLINE.with(Cell::get)
}

/// A POSIX timer that signals this thread with SIGALRM, tagged with `tag`.
fn thread_timer(tag: usize) -> Result<libc::timer_t, Error> {
    // SAFETY: a zeroed sigevent is valid.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = libc::SIGALRM;
    sev.sigev_value = libc::sigval {
        sival_ptr: tag as *mut libc::c_void,
    };
    // SAFETY: gettid has no preconditions.
    sev.sigev_notify_thread_id = unsafe { libc::gettid() };
    let mut timer: libc::timer_t = ptr::null_mut();
    // SAFETY: valid sigevent and out-pointer.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
        return Err(Error::setup("creating the watchdog timer")(
            io::Error::last_os_error(),
        ));
    }
    Ok(timer)
}

/// Arm `timer` to fire after `first`, then every `period` (zero: once).
fn arm(timer: libc::timer_t, first: Duration, period: Duration) -> Result<(), Error> {
    let spec = libc::itimerspec {
        it_interval: timespec(period),
        it_value: timespec(first),
    };
    // SAFETY: the timer was created by thread_timer; `spec` is a valid itimerspec.
    if unsafe { libc::timer_settime(timer, 0, &spec, ptr::null_mut()) } != 0 {
        return Err(Error::setup("arming the watchdog timer")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The watchdog and the deadline of the vCPU running on the current thread.
pub struct Watchdog {
    timer: libc::timer_t,
    deadline_timer: Option<libc::timer_t>,
}

impl Watchdog {
    /// Register `run` (this thread's vCPU), start ticking for a limit of `limit`, and
    /// stop the VM once `deadline` has passed.
    pub fn new(run: *mut kvm_run, limit: Duration, deadline: Duration) -> Result<Watchdog, Error> {
        install_handler()?;
        // Unblock SIGALRM on this thread in case the caller blocked it.
        // SAFETY: plain signal-mask manipulation of the current thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGALRM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
        }
        let mut watchdog = Watchdog {
            timer: thread_timer(0)?,
            deadline_timer: None,
        };
        watchdog.deadline_timer = Some(thread_timer(DEADLINE_TAG)?);
        KVM_RUN.with(|c| c.set(run));
        FIRED.with(|f| f.set(false));
        DEADLINE.with(|f| f.set(false));
        EXITS.with(|e| e.store(0, Ordering::Relaxed));
        IN_GUEST.with(|g| g.store(false, Ordering::Relaxed));
        SEEN.with(|s| s.set(NOT_RUNNING));
        STALE.with(|s| s.set(0));
        // A zero period or first expiry would disarm a timer.
        let period = (limit / TICKS).max(Duration::from_micros(1));
        arm(watchdog.timer, period, period)?;
        if let Some(t) = watchdog.deadline_timer {
            arm(t, deadline.max(Duration::from_micros(1)), Duration::ZERO)?;
        }
        Ok(watchdog)
    }

    /// Call right before `KVM_RUN`.
    pub fn entering_guest(&self) {
        IN_GUEST.with(|g| g.store(true, Ordering::Relaxed));
    }

    /// Call when `KVM_RUN` returned with a VM exit (not when a signal interrupted it),
    /// before the exit is served.
    pub fn guest_exited(&self) {
        EXITS.with(|e| e.fetch_add(1, Ordering::Relaxed));
        IN_GUEST.with(|g| g.store(false, Ordering::Relaxed));
    }

    /// Whether the watchdog stopped the guest.
    pub fn fired(&self) -> bool {
        FIRED.with(Cell::get)
    }

    /// Whether the deadline passed.
    pub fn deadline_passed(&self) -> bool {
        deadline_passed()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(ptr::null_mut()));
        IN_GUEST.with(|g| g.store(false, Ordering::Relaxed));
        // SAFETY: the timers were created by `new`; deleting one also disarms it.
        unsafe {
            libc::timer_delete(self.timer);
            if let Some(t) = self.deadline_timer {
                libc::timer_delete(t);
            }
        }
    }
}
