//! Closing finished VMs off the caller's path.
//!
//! Destroying a VM here (closing its vCPU and VM descriptors, unmapping guest RAM) takes
//! about 1 ms of kernel time, mostly KVM freeing the VM's shadow page tables. The vCPU
//! thread hands those objects to one background thread per process instead, so that
//! [`crate::run`] returns at once and the kernel work overlaps what the caller does
//! next (a safe rebase starts four VMs in a row). The image files are not among them:
//! they are closed or returned before `run` returns.
//!
//! The thread is started by the first [`start`] in a process (from an unconfined
//! thread) and lives as long as the process. It confines itself with a seccomp allowlist
//! ([`crate::seccomp::build_teardown`]: close, memory management, futex, exit) before
//! it drops anything. Whenever it is not there (it could not start or confine itself),
//! [`later`] drops the objects on the spot. A panic on the thread (the panic hook is
//! silent there, see [`crate::seccomp`]) ends it the same way: later sends fail.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, PoisonError};

type Item = Box<dyn Send>;

/// The running thread's queue, and the process it runs in: a child forked without
/// exec has the queue but not the thread, and starts its own.
static QUEUE: Mutex<Option<(libc::pid_t, Sender<Item>)>> = Mutex::new(None);

fn spawn() -> Option<Sender<Item>> {
    let program = crate::seccomp::build_teardown().ok()?;
    let (tx, rx) = channel::<Item>();
    std::thread::Builder::new()
        .name("instar-teardown".into())
        .stack_size(64 << 10)
        .spawn(move || {
            // SAFETY: plain signal-mask manipulation of the current thread: the
            // caller's signals are not this thread's business.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut set);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            if crate::seccomp::apply(&program).is_err() {
                // Dropping `rx` makes every later send fail: the objects are then
                // dropped by their owners.
                return;
            }
            drop(program);
            for item in rx {
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::reached(crate::test_hooks::Site::Teardown);
                drop(item);
            }
        })
        .ok()?;
    Some(tx)
}

/// Start the teardown thread if this process has none yet. Call from an unconfined
/// thread.
pub fn start() {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut queue = QUEUE.lock().unwrap_or_else(PoisonError::into_inner);
    if queue.as_ref().is_some_and(|(p, _)| *p == pid) {
        return;
    }
    *queue = spawn().map(|tx| (pid, tx));
}

/// Drop `item` on the teardown thread, or here if there is none. Objects in a tuple
/// are dropped in order.
pub fn later<T: Send + 'static>(item: T) {
    let boxed: Item = Box::new(item);
    let queue = QUEUE.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((_, tx)) = queue.as_ref() else {
        drop(queue);
        drop(boxed);
        return;
    };
    // A failed send hands the item back; it is dropped here, after the lock.
    let failed = tx.send(boxed).err();
    drop(queue);
    drop(failed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Sender;
    use std::time::Duration;

    struct Noted(&'static str, Sender<(&'static str, Option<String>)>);
    impl Drop for Noted {
        fn drop(&mut self) {
            let thread = std::thread::current().name().map(str::to_string);
            let _ = self.1.send((self.0, thread));
        }
    }

    #[test]
    fn items_are_dropped_in_order_on_the_teardown_thread() {
        start();
        let (tx, rx) = channel();
        later((
            Noted("vcpu", tx.clone()),
            Noted("vm", tx.clone()),
            Noted("mem", tx),
        ));
        let got: Vec<_> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        let teardown = Some("instar-teardown".to_string());
        assert_eq!(
            got,
            [
                ("vcpu", teardown.clone()),
                ("vm", teardown.clone()),
                ("mem", teardown)
            ]
        );
    }
}
