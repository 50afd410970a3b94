//! The allowlist applied to the vCPU thread once the VM is set up.
//!
//! Only the current thread is filtered (no TSYNC): the caller's threads go on
//! unconfined after the run. Anything else kills the whole process with SIGSYS.
//!
//! A confined thread must never reach a refused call by itself, panics included: the
//! default panic hook asks for the thread's id (`gettid`) and, with `RUST_BACKTRACE`,
//! reads files. [`apply`] marks the thread confined, and the hook [`install_panic_hook`]
//! puts in front of the previous one does nothing on such a thread: the message stays
//! in the panic payload, which the thread that joins it reports.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::Error;

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`: reading RIP for an error report.
const KVM_GET_REGS: u64 =
    (2 << 30) | ((std::mem::size_of::<kvm_bindings::kvm_regs>() as u64) << 16) | 0xae81;

/// What the run loop is allowed to touch.
pub struct Allowed<'a> {
    pub vcpu_fd: RawFd,
    /// Every device's file (pread64, fdatasync).
    pub device_fds: &'a [RawFd],
    /// The files of writable devices (pwrite64).
    pub writable_fds: &'a [RawFd],
}

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(filter_error)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conds).map_err(filter_error)
}

fn filter_error(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("cannot build the seccomp filter: {e}"))
}

fn fd_rules(fds: &[RawFd]) -> Result<Vec<SeccompRule>, Error> {
    fds.iter()
        .map(|&fd| rule(vec![cond(0, Op::Eq, fd as u64)?]))
        .collect()
}

/// Build the filter.
pub fn build(allowed: &Allowed<'_>) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let vcpu = allowed.vcpu_fd as u64;
    rules.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(0, Op::Eq, vcpu)?, cond(1, Op::Eq, KVM_RUN)?])?,
            rule(vec![cond(0, Op::Eq, vcpu)?, cond(1, Op::Eq, KVM_GET_REGS)?])?,
        ],
    );
    rules.insert(libc::SYS_pread64, fd_rules(allowed.device_fds)?);
    rules.insert(libc::SYS_fdatasync, fd_rules(allowed.device_fds)?);
    if !allowed.writable_fds.is_empty() {
        rules.insert(libc::SYS_pwrite64, fd_rules(allowed.writable_fds)?);
    }
    // Progress output.
    rules.insert(libc::SYS_write, fd_rules(&[1, 2])?);
    // The watchdog's signal handler (its timer is armed once, before the filter).
    rules.insert(libc::SYS_rt_sigreturn, vec![]);
    close_rules(&mut rules)?;
    // The watchdog's timer is deleted at the end of the run.
    rules.insert(libc::SYS_timer_delete, vec![]);
    thread_rules(&mut rules)?;
    compile(rules)
}

/// Build the filter of an I/O worker ([`crate::io_pool`]): it only reads the device
/// files into guest memory (split reads; writes are never handed to workers), waits on
/// futexes, and exits. `write` to fd 2 is there for a panic message.
pub fn build_io_worker(device_fds: &[RawFd]) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_pread64, fd_rules(device_fds)?);
    rules.insert(libc::SYS_write, fd_rules(&[2])?);
    thread_rules(&mut rules)?;
    compile(rules)
}

/// Build the filter of the teardown thread ([`crate::teardown`]): it closes finished
/// VMs' descriptors and unmaps their memory.
pub fn build_teardown() -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    close_rules(&mut rules)?;
    rules.insert(libc::SYS_write, fd_rules(&[2])?);
    thread_rules(&mut rules)?;
    compile(rules)
}

/// Closing descriptors (the VM's, a reopened read-only image).
fn close_rules(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), Error> {
    rules.insert(libc::SYS_close, vec![]);
    // Rust's std checks a descriptor with F_GETFD before closing it (debug builds).
    rules.insert(
        libc::SYS_fcntl,
        vec![rule(vec![cond(1, Op::Eq, libc::F_GETFD as u64)?])?],
    );
    Ok(())
}

/// What any confined thread needs: memory management by the allocator (never
/// executable memory), locks, and thread exit (which frees the thread's caches and
/// its signal stack).
fn thread_rules(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), Error> {
    let no_exec = || cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(
        libc::SYS_mmap,
        vec![rule(vec![
            no_exec()?,
            cond(
                3,
                Op::MaskedEq(libc::MAP_ANONYMOUS as u64),
                libc::MAP_ANONYMOUS as u64,
            )?,
        ])?],
    );
    rules.insert(libc::SYS_mprotect, vec![rule(vec![no_exec()?])?]);
    // glibc's realloc of a large block moves it with mremap, which keeps the mapping's
    // protection (it cannot add PROT_EXEC).
    for sys in [
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(sys, vec![]);
    }
    Ok(())
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(filter_error)?;
    filter.try_into().map_err(filter_error)
}

thread_local! {
    /// Whether this thread runs under one of the filters.
    static CONFINED: Cell<bool> = const { Cell::new(false) };
}

static PANIC_HOOK: Once = Once::new();

/// Put a panic hook in front of the current one (once per process): silent on
/// confined threads, the previous hook everywhere else. Call from an unconfined thread
/// before any thread is confined.
pub fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONFINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Confine the current thread (first making sure the panic hook is in place, while
/// the thread may still make any call).
pub fn apply(program: &BpfProgram) -> Result<(), Error> {
    install_panic_hook();
    seccompiler::apply_filter(program)
        .map_err(|e| Error::Config(format!("cannot apply the seccomp filter: {e}")))?;
    CONFINED.with(|c| c.set(true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_thread_may_grow_large_allocations_and_panic() {
        // glibc moves a large block with mremap when it grows; the default panic hook
        // would call gettid. Either refused would kill the whole test process.
        let program = build_teardown().unwrap();
        let joined = std::thread::spawn(move || {
            apply(&program).unwrap();
            let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
            for size in [4 << 20, 16 << 20, 64 << 20] {
                v.resize(size, 1);
            }
            assert_eq!(v.len(), 64 << 20);
            panic!("a panic on a confined thread");
        })
        .join();
        let payload = joined.unwrap_err();
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"a panic on a confined thread")
        );
    }
}
