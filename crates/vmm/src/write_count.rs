//! What the devices of one VM count of the writes that reached their files: the
//! fault-injection limit of crash tests and the test-only record of writes and flushes
//! that power-loss tests replay.

/// Completed write requests (`VIRTIO_BLK_T_OUT` that reached the file) across the
/// devices of one VM, and the fault-injection limit.
#[derive(Debug, Clone, Default)]
pub struct WriteCount {
    /// Writes that reached the file so far.
    pub done: u64,
    /// Stop the VM once this many writes are done (`Some(0)`: before the first one).
    pub stop_after: Option<u64>,
    /// Set when the limit was hit: the device served nothing after that write, and the
    /// VM must not resume.
    pub stopped: bool,
    /// Test-only record of completed writes and flushes, in order
    /// ([`crate::Config::record_writes`]); `None` records nothing.
    pub log: Option<Vec<BlockOp>>,
}

/// One completed request that changes what a power loss can leave on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// `len` bytes written at byte `offset` of device `device`.
    Write {
        device: usize,
        offset: u64,
        len: u64,
    },
    /// A flush of device `device` that succeeded.
    Flush { device: usize },
}

impl WriteCount {
    pub(crate) fn limit_reached(&self) -> bool {
        self.stop_after.is_some_and(|k| self.done >= k)
    }

    pub(crate) fn record(&mut self, op: BlockOp) {
        let Some(log) = &mut self.log else {
            return;
        };
        if log.len() == log.capacity() {
            // Grow by a fresh allocation and a copy: `realloc` of a large block may
            // use mremap, which the vCPU thread's seccomp filter does not allow.
            let mut bigger = Vec::with_capacity((log.capacity() * 2).max(64));
            bigger.extend_from_slice(log);
            *log = bigger;
        }
        log.push(op);
    }
}
