//! Host I/O between the image files and guest memory, with large reads shared between
//! the vCPU thread and a small pool of worker threads.
//!
//! Copying page-cache data into guest memory is most of a bulk read's cost, and the
//! vCPU waits for it. A read of at least [`PARALLEL_MIN`] bytes is cut into chunks of
//! [`CHUNK`] bytes that the vCPU thread and the workers take in turn from a shared
//! counter until none is left; the request completes when every chunk is done. Work
//! is shared rather than assigned, so a worker that starts late (a sleeping thread
//! takes ~35 µs to wake here) or gets little CPU (other jobs on the machine) costs at
//! most the chunk it has in hand: the vCPU thread takes the rest, and a job no worker
//! has started yet is withdrawn. Writes are not split: ext4 (like most Linux file
//! systems) serialises buffered writes to one file on its inode lock, so a second
//! writer only waits.
//!
//! A worker blocks every signal and confines itself with its own seccomp allowlist
//! ([`crate::seccomp::build_io_worker`]) before it takes its first job; a worker that
//! cannot do so exits, and the vCPU thread does every chunk. Workers touch guest memory
//! and the image files only through the [`Piece`]s they are handed, and a job never
//! outlives the call that submitted it: [`IoPool::execute`] returns (or unwinds) only
//! once no worker uses the pieces any more, so guest memory stays mapped while a worker
//! writes into it. A worker only ever waits for a job or does bounded `pread64` loops,
//! so waiting for it cannot hang on anything the guest controls. Dropping the pool
//! stops and joins every worker.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

use crate::Error;

/// Reads of at least this many bytes are shared. Below it the hand-off to a worker
/// costs about as much as it saves.
pub const PARALLEL_MIN: usize = 512 << 10;
/// The unit of sharing: ~30 µs of copying here. Smaller chunks cost more system calls;
/// larger ones let a slow worker hold up the request longer.
pub const CHUNK: usize = 256 << 10;
/// Workers per VM. The project's machines have 2 cores: the vCPU thread and one worker.
pub const WORKERS: usize = 1;
/// Small: a worker runs a copy loop and nothing else.
const WORKER_STACK: usize = 128 << 10;
/// How long the vCPU thread polls for a worker's last chunk before it sleeps, in
/// `spin_loop` rounds (~30 ns each here, so ~0.15 ms with the yields): a chunk takes
/// ~30 µs, and a futex wake-up ~35 µs.
const SPIN_FOR_DONE: u32 = 4 << 10;

/// Poll `ready` for up to `rounds` rounds, yielding the CPU now and then (a thread we
/// wait for may share it); whether `ready` became true.
fn spin_until(rounds: u32, ready: impl Fn() -> bool) -> bool {
    for i in 0..rounds {
        if ready() {
            return true;
        }
        if i % 128 == 127 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    ready()
}

/// Which way a request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// File to guest memory (`pread64`); past the end of the file the guest gets zeros.
    Read,
    /// Guest memory to file (`pwrite64`).
    Write,
}
/// One contiguous range of guest memory and where it lives in a file.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    pos: u64,
}

// SAFETY: a Piece is a range of guest RAM (valid for the life of the VM's memory, see
// `Piece::new`) and a file descriptor number; moving it to a worker thread is what it is
// for, and the submitter waits for that worker before the memory can go away.
unsafe impl Send for Piece {}

impl Piece {
    /// `len` bytes at `ptr`, at offset `pos` of the file `fd`.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must be mapped memory, valid for reads and writes, for as long
    /// as the piece (or a copy of it) may be used, and `fd` must stay open as long.
    pub unsafe fn new(fd: RawFd, ptr: *mut u8, len: usize, pos: u64) -> Piece {
        Piece { fd, ptr, len, pos }
    }

    /// The part of this piece that lies in `[from, to)` of a request in which the piece
    /// starts at byte `at`.
    fn clip(&self, at: usize, from: usize, to: usize) -> Option<Piece> {
        let start = from.max(at);
        let end = to.min(at + self.len);
        (start < end).then(|| Piece {
            fd: self.fd,
            // SAFETY: start - at < self.len, so this stays inside the piece's range.
            ptr: unsafe { self.ptr.add(start - at) },
            len: end - start,
            pos: self.pos + (start - at) as u64,
        })
    }

    fn run(&self, dir: Dir) -> bool {
        match dir {
            Dir::Read => self.read(),
            Dir::Write => self.write(),
        }
    }

    /// `pread64` the whole piece; bytes past the end of the file read as zeros.
    fn read(&self) -> bool {
        let mut done = 0usize;
        while done < self.len {
            let Ok(off) = i64::try_from(self.pos + done as u64) else {
                return false;
            };
            // SAFETY: [ptr + done, ptr + len) is inside the piece's memory (Piece::new).
            let n =
                unsafe { libc::pread64(self.fd, self.ptr.add(done).cast(), self.len - done, off) };
            match n {
                0 => {
                    // End of file: the rest reads as zeros. Volatile, like every other
                    // host access to memory the guest shares.
                    for i in done..self.len {
                        // SAFETY: i < len, inside the piece's memory.
                        unsafe { std::ptr::write_volatile(self.ptr.add(i), 0) };
                    }
                    done = self.len;
                }
                n if n > 0 => done += n as usize,
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
        true
    }

    /// `pwrite64` the whole piece.
    fn write(&self) -> bool {
        let mut done = 0usize;
        while done < self.len {
            let Ok(off) = i64::try_from(self.pos + done as u64) else {
                return false;
            };
            // SAFETY: [ptr + done, ptr + len) is inside the piece's memory (Piece::new).
            let n =
                unsafe { libc::pwrite64(self.fd, self.ptr.add(done).cast(), self.len - done, off) };
            match n {
                n if n > 0 => done += n as usize,
                n if n < 0
                    && std::io::Error::last_os_error().kind()
                        == std::io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
        true
    }
}

/// Every piece in order; false as soon as one fails.
fn run_all(dir: Dir, pieces: impl IntoIterator<Item = Piece>) -> bool {
    pieces.into_iter().all(|p| p.run(dir))
}

/// Take chunks from `next` until none is left, and do them; false if one failed.
fn run_chunks(dir: Dir, pieces: &[Piece], total: usize, next: &AtomicUsize) -> bool {
    let mut ok = true;
    loop {
        let from = next.fetch_add(1, Ordering::Relaxed).saturating_mul(CHUNK);
        if from >= total {
            return ok;
        }
        ok &= run_all(dir, part(pieces, from, (from + CHUNK).min(total)));
    }
}

/// The pieces of a request that cover its bytes `[from, to)`.
fn part(pieces: &[Piece], from: usize, to: usize) -> impl Iterator<Item = Piece> + '_ {
    pieces
        .iter()
        .scan(0usize, |at, p| {
            let start = *at;
            *at += p.len;
            Some((start, p))
        })
        .filter_map(move |(at, p)| p.clip(at, from, to))
}

/// What a worker and its submitter share.
struct SlotState {
    dir: Dir,
    /// The request's pieces and length. The vector travels to the worker and back, so
    /// that its allocation is reused and the worker never allocates or frees.
    pieces: Vec<Piece>,
    total: usize,
    /// A job is waiting or running.
    pending: bool,
    /// The worker has taken the pending job.
    running: bool,
    /// The last job's result.
    ok: bool,
    /// The pool is being dropped.
    shutdown: bool,
    /// The worker has exited (or never got going); it takes no more jobs.
    dead: bool,
    /// The worker sleeps on `Slot::job`.
    worker_asleep: bool,
    /// The submitter sleeps on `Slot::done`.
    submitter_asleep: bool,
}

struct Slot {
    state: Mutex<SlotState>,
    /// Wakes the worker: a job or shutdown.
    job: Condvar,
    /// Wakes the submitter: the job is done or the worker is gone.
    done: Condvar,
    /// `SlotState::pending`, readable without the lock, for polling.
    busy: AtomicBool,
    /// The pool's chunk counter for the current request.
    next: Arc<AtomicUsize>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state is a few plain fields, consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Worker {
    slot: Arc<Slot>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Offer the worker a share of a request; false if it takes no jobs any more.
    fn submit(&self, dir: Dir, pieces: &[Piece], total: usize) -> bool {
        let mut st = self.slot.lock();
        if st.dead || st.pending {
            return false;
        }
        st.pieces.clear();
        st.pieces.extend_from_slice(pieces);
        st.total = total;
        st.dir = dir;
        st.pending = true;
        self.slot.busy.store(true, Ordering::Release);
        let asleep = st.worker_asleep;
        drop(st);
        if asleep {
            self.slot.job.notify_one();
        }
        true
    }

    /// Once the caller found no chunk left: withdraw the job if the worker has not
    /// taken it, else wait for the chunk it has in hand. False if a chunk of the
    /// worker's failed, or it died holding one.
    fn wait(&self) -> bool {
        let mut st = self.slot.lock();
        if st.pending && !st.running {
            st.pending = false;
            self.slot.busy.store(false, Ordering::Release);
            return true;
        }
        if !st.pending {
            return st.ok;
        }
        drop(st);
        spin_until(SPIN_FOR_DONE, || !self.slot.busy.load(Ordering::Acquire));
        st = self.slot.lock();
        while st.pending && !st.dead {
            st.submitter_asleep = true;
            st = self
                .slot
                .done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
            st.submitter_asleep = false;
        }
        !st.pending && st.ok
    }
}

/// Marks the slot dead when the worker leaves its loop in any way (also unwinding), so
/// that a submitter never waits for a worker that is gone.
struct DeadOnExit<'a>(&'a Slot);

impl Drop for DeadOnExit<'_> {
    fn drop(&mut self) {
        self.0.lock().dead = true;
        self.0.busy.store(false, Ordering::Release);
        self.0.done.notify_all();
    }
}

fn block_all_signals() {
    // SAFETY: plain signal-mask manipulation of the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn worker_main(slot: &Slot, program: BpfProgram) {
    let _dead = DeadOnExit(slot);
    block_all_signals();
    if crate::seccomp::apply(&program).is_err() {
        return;
    }
    drop(program);
    let mut st = slot.lock();
    loop {
        if st.pending {
            let (dir, total) = (st.dir, st.total);
            let pieces = std::mem::take(&mut st.pieces);
            st.running = true;
            drop(st);
            #[cfg(feature = "test-hooks")]
            crate::test_hooks::reached(crate::test_hooks::Site::IoWorker);
            let ok = run_chunks(dir, &pieces, total, &slot.next);
            st = slot.lock();
            st.pieces = pieces;
            st.ok = ok;
            st.pending = false;
            st.running = false;
            slot.busy.store(false, Ordering::Release);
            if st.submitter_asleep {
                slot.done.notify_one();
            }
        } else if st.shutdown {
            return;
        } else {
            st.worker_asleep = true;
            st = slot.job.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.worker_asleep = false;
        }
    }
}

/// Waits for every submitted share when dropped, also while unwinding: guest memory
/// must not be unmapped under a worker.
struct Outstanding<'a> {
    workers: &'a [Worker],
    /// Bit i: worker i was offered a share of the current request.
    submitted: u32,
}

impl Outstanding<'_> {
    fn finish(mut self) -> bool {
        let mut ok = true;
        for (i, w) in self.workers.iter().enumerate() {
            if self.submitted & (1 << i) != 0 {
                ok &= w.wait();
            }
        }
        self.submitted = 0;
        ok
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        for (i, w) in self.workers.iter().enumerate() {
            if self.submitted & (1 << i) != 0 {
                w.wait();
            }
        }
    }
}

/// The I/O workers of one VM.
pub struct IoPool {
    workers: Vec<Worker>,
    /// Chunks taken of the current request.
    next: Arc<AtomicUsize>,
}

const _: () = assert!(WORKERS < 32);

impl IoPool {
    /// A pool that does everything on the calling thread.
    pub fn inline() -> IoPool {
        IoPool {
            workers: Vec::new(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Start `count` workers (at most [`WORKERS`] are used), each confining itself with
    /// `program` before its first job.
    pub fn start(count: usize, program: &BpfProgram) -> Result<IoPool, Error> {
        let mut pool = IoPool::inline();
        for _ in 0..count.min(WORKERS) {
            let slot = Arc::new(Slot {
                state: Mutex::new(SlotState {
                    dir: Dir::Read,
                    pieces: Vec::with_capacity(8),
                    total: 0,
                    pending: false,
                    running: false,
                    ok: false,
                    shutdown: false,
                    dead: false,
                    worker_asleep: false,
                    submitter_asleep: false,
                }),
                job: Condvar::new(),
                done: Condvar::new(),
                busy: AtomicBool::new(false),
                next: Arc::clone(&pool.next),
            });
            let theirs = Arc::clone(&slot);
            let program = program.clone();
            let handle = std::thread::Builder::new()
                .name("instar-io".into())
                .stack_size(WORKER_STACK)
                .spawn(move || worker_main(&theirs, program))
                .map_err(Error::setup("starting an I/O worker"))?;
            pool.workers.push(Worker {
                slot,
                handle: Some(handle),
            });
        }
        Ok(pool)
    }

    /// Move the data of one request (its pieces in request order); false if any part
    /// failed. Returns only when no worker touches the pieces any more.
    pub fn execute(&self, dir: Dir, pieces: &[Piece]) -> bool {
        let total: usize = pieces.iter().map(|p| p.len).sum();
        // Workers only ever read (their seccomp filter has no pwrite64).
        if dir == Dir::Write || total < PARALLEL_MIN || self.workers.is_empty() {
            return run_all(dir, pieces.iter().copied());
        }
        // No worker holds a job (the previous request waited for them all), so nobody
        // reads the counter while it is reset; submitting publishes it.
        self.next.store(0, Ordering::Relaxed);
        let mut outstanding = Outstanding {
            workers: &self.workers,
            submitted: 0,
        };
        for (i, w) in self.workers.iter().enumerate() {
            if w.submit(dir, pieces, total) {
                outstanding.submitted |= 1 << i;
            }
        }
        let ok = run_chunks(dir, pieces, total, &self.next);
        outstanding.finish() && ok
    }

    /// Tell every worker to exit (none holds a job between requests); [`Drop`] joins
    /// them.
    pub fn stop(&self) {
        for w in &self.workers {
            let mut st = w.slot.lock();
            if st.shutdown {
                continue;
            }
            st.shutdown = true;
            drop(st);
            w.slot.job.notify_one();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.stop();
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                // A worker that panicked has already marked itself dead; nothing to do.
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write as _;
    use std::os::fd::AsRawFd;

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn temp(tag: &str, contents: &[u8]) -> (TempFile, File) {
        let path = std::env::temp_dir().join(format!("instar-io-{}-{tag}", std::process::id()));
        File::create(&path).unwrap().write_all(contents).unwrap();
        let file = File::open(&path).unwrap();
        (TempFile(path), file)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 + 1).collect()
    }

    /// Pieces of `sizes` bytes over `buf`, reading `fd` from `pos` on.
    fn pieces(fd: RawFd, buf: &mut [u8], sizes: &[usize], pos: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = 0usize;
        for &n in sizes {
            // SAFETY: [at, at + n) is inside `buf`, which outlives the pieces' use.
            out.push(unsafe { Piece::new(fd, buf[at..at + n].as_mut_ptr(), n, pos + at as u64) });
            at += n;
        }
        assert_eq!(at, buf.len());
        out
    }

    fn pool_for(fds: &[RawFd]) -> IoPool {
        IoPool::start(WORKERS, &crate::seccomp::build_io_worker(fds).unwrap()).unwrap()
    }

    /// Hand a whole request to the first worker and let it do every chunk.
    fn worker_only(pool: &IoPool, dir: Dir, p: &[Piece]) -> bool {
        let total = p.iter().map(|q| q.len).sum();
        pool.next.store(0, Ordering::Relaxed);
        let w = &pool.workers[0];
        assert!(w.submit(dir, p, total));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.slot.busy.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "the worker is stuck");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        w.wait()
    }

    #[test]
    fn parts_cover_the_request_exactly() {
        let mut buf = vec![0u8; 10];
        let p = pieces(7, &mut buf, &[3, 0, 4, 3], 100);
        let got: Vec<(u64, usize)> = part(&p, 2, 8).map(|q| (q.pos, q.len)).collect();
        assert_eq!(got, [(102, 1), (103, 4), (107, 1)]);
        assert_eq!(part(&p, 10, 10).count(), 0);
        assert_eq!(part(&p, 0, 10).map(|q| q.len).sum::<usize>(), 10);
    }

    #[test]
    fn split_reads_match_the_file_and_read_zeros_past_its_end() {
        // 1.5 MiB + 100 bytes of data; a 3 MiB read from offset 4096 over uneven pieces
        // crosses the end of the file in the worker's half.
        let contents = pattern((3 << 19) + 100);
        let (_t, file) = temp("split", &contents);
        let pool = pool_for(&[file.as_raw_fd()]);
        let mut buf = vec![0xaau8; 3 << 20];
        let sizes = [1000, (1 << 20) - 1000, 512, (2 << 20) - 512];
        let p = pieces(file.as_raw_fd(), &mut buf, &sizes, 4096);
        assert!(pool.execute(Dir::Read, &p));
        let data = contents.len() - 4096;
        assert_eq!(&buf[..data], &contents[4096..]);
        assert!(buf[data..].iter().all(|&b| b == 0));

        // The same request done by the worker alone.
        buf.fill(0xaa);
        assert!(worker_only(&pool, Dir::Read, &p));
        assert_eq!(&buf[..data], &contents[4096..]);
        assert!(buf[data..].iter().all(|&b| b == 0));

        // Small reads stay on this thread and give the same bytes.
        let mut small = vec![0u8; 4096];
        let p = pieces(file.as_raw_fd(), &mut small, &[4096], 8192);
        assert!(pool.execute(Dir::Read, &p));
        assert_eq!(&small[..], &contents[8192..12288]);
    }

    #[test]
    fn a_failing_part_fails_the_request() {
        let (_t, file) = temp("fail", &pattern(4096));
        let pool = pool_for(&[file.as_raw_fd()]);
        let mut buf = vec![0u8; 1 << 20];
        // The second half starts past the largest file offset: the worker's part fails.
        let pos = i64::MAX as u64 - (600 << 10);
        let p = pieces(file.as_raw_fd(), &mut buf, &[1 << 20], pos);
        assert!(!pool.execute(Dir::Read, &p));
        assert!(!worker_only(&pool, Dir::Read, &p));
        // The pool still works afterwards.
        let p = pieces(file.as_raw_fd(), &mut buf, &[1 << 20], 0);
        assert!(pool.execute(Dir::Read, &p));
        assert_eq!(&buf[..4096], &pattern(4096)[..]);
    }

    #[test]
    fn a_worker_that_cannot_confine_itself_takes_no_jobs() {
        let contents = pattern(1 << 20);
        let (_t, file) = temp("dead", &contents);
        // seccompiler refuses an empty program: the worker exits at once.
        let pool = IoPool::start(WORKERS, &BpfProgram::new()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let p = pieces(file.as_raw_fd(), &mut buf, &[1 << 20], 0);
        assert!(pool.execute(Dir::Read, &p));
        assert_eq!(buf, contents);
        // Once it is gone, the vCPU side does everything, without waiting.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pool.workers[0].slot.lock().dead {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        buf.fill(0);
        assert!(pool.execute(Dir::Read, &p));
        assert_eq!(buf, contents);
    }

    const CONFINED_CHILD: &str = "INSTAR_IO_POOL_CONFINED_CHILD";

    /// Run by `workers_are_confined_to_the_device_files` in a child process: the worker
    /// alone reads a file its filter does not name; its pread64 must kill the process
    /// with SIGSYS.
    #[test]
    fn confined_child() {
        if std::env::var_os(CONFINED_CHILD).is_none() {
            return;
        }
        let (_t, allowed) = temp("allowed", &pattern(4096));
        let (_u, other) = temp("other", &pattern(2 << 20));
        let pool = pool_for(&[allowed.as_raw_fd()]);
        let mut buf = vec![0u8; 2 << 20];
        let p = pieces(other.as_raw_fd(), &mut buf, &[2 << 20], 0);
        let ok = worker_only(&pool, Dir::Read, &p);
        println!("NOT KILLED: {ok}");
    }

    #[test]
    fn workers_are_confined_to_the_device_files() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "io_pool::tests::confined_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CONFINED_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("NOT KILLED"), "{stdout}");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
    }
}
