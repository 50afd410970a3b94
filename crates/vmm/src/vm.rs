//! Building the VM and running its vCPU.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

use instar_abi::layout::{
    DOORBELL_ADDR, DOORBELL_DONE, DOORBELL_PANIC, DOORBELL_PROGRESS, DOORBELL_WRITE_END_HIGH,
    DOORBELL_WRITE_PHASE, MAX_DEVICES, PAGE_TABLES_ADDR, REQUEST_ADDR, REQUEST_SIZE, RESPONSE_ADDR,
    RESPONSE_SIZE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE,
};
use instar_abi::{Call, Request, SelfTest};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::io_pool::{self, IoPool};
use crate::memory::{self, GuestMemory};
use crate::virtio_blk::{Backing, BlockDevice, WriteCount};
use crate::watchdog::Watchdog;
use crate::{seccomp, teardown, Config, Device, Error};

/// How the guest ended, before its response is decoded (outside the filtered thread).
pub enum RawExit {
    /// DONE: the response area.
    Done(Vec<u8>),
    /// PANIC: the response area holding the message.
    Panic(Vec<u8>),
}

pub struct RawOutcome {
    pub exit: RawExit,
    pub write_phase: bool,
    pub writes: u64,
    pub io_log: Vec<crate::BlockOp>,
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The file a device uses: read-only devices never hold a writable descriptor, so a
/// writable one from the caller is reopened read-only.
fn backing<'a>(index: usize, dev: &Device<'a>) -> Result<Backing<'a>, Error> {
    // SAFETY: F_GETFL on a descriptor owned by a live File.
    let flags = unsafe { libc::fcntl(dev.file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::setup("inspecting a device file")(
            std::io::Error::last_os_error(),
        ));
    }
    let mode = flags & libc::O_ACCMODE;
    if dev.writable {
        if mode != libc::O_RDWR {
            return Err(Error::Config(format!(
                "device {index} is writable but its file is not open for reading and writing"
            )));
        }
        return Ok(Backing::Borrowed(dev.file));
    }
    if mode == libc::O_RDONLY {
        return Ok(Backing::Borrowed(dev.file));
    }
    let path = format!("/proc/self/fd/{}", dev.file.as_raw_fd());
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(Error::setup("reopening a read-only device"))?;
    Ok(Backing::Owned(file))
}

/// `/dev/kvm` and its supported CPUID, opened and asked once per process: both are the
/// same for every VM, and KVM_GET_SUPPORTED_CPUID alone takes ~0.1 ms here.
struct Host {
    kvm: Kvm,
    cpuid: CpuId,
}

static HOST: OnceLock<Host> = OnceLock::new();

fn host() -> Result<&'static Host, Error> {
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let kvm = Kvm::new().map_err(|e| Error::kvm_open(e.into()))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::setup("KVM_GET_SUPPORTED_CPUID")(e.into()))?;
    // Two first runs at once: one Host wins, the other is dropped.
    Ok(HOST.get_or_init(|| Host { kvm, cpuid }))
}

fn setup_vcpu(cpuid: &CpuId, vcpu: &VcpuFd, entry: u64, ram_size: u64) -> Result<(), Error> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| Error::setup("KVM_SET_CPUID2")(e.into()))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::setup("KVM_GET_SREGS")(e.into()))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: memory::KERNEL_CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: memory::KERNEL_DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = instar_abi::layout::GDT_ADDR;
    sregs.gdt.limit = memory::GDT_LIMIT;
    // No IDT: any exception ends as a triple fault, reported with RIP.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PAGE_TABLES_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::setup("KVM_SET_SREGS")(e.into()))?;

    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rflags: 2,
        rdi: ram_size,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::setup("KVM_SET_REGS")(e.into()))
}

fn fault_at(vcpu: &VcpuFd, what: &str) -> Error {
    match vcpu.get_regs() {
        Ok(r) => Error::GuestFault(format!("{what} at RIP {:#x}", r.rip)),
        Err(_) => Error::GuestFault(what.to_string()),
    }
}

/// Whether the guest will read image data in bulk: a safe rebase (comparing and
/// copying), or a read self-test of a large range. Probes and `-u` rebases read headers
/// and tables in small requests; an I/O worker would only cost its start and join.
fn moves_bulk_data(call: &Call) -> bool {
    match &call.request {
        Request::Rebase(r) => !r.unsafe_mode,
        Request::SelfTest(SelfTest::Read { len, .. }) => *len as usize >= io_pool::PARALLEL_MIN,
        _ => false,
    }
}

/// What one exit asks the loop to do next.
enum Step {
    Continue,
    Finish(RawExit),
    Fault(String),
}

/// Set up the VM on the current thread, confine the thread, and run the guest.
/// The I/O workers are joined and the image files released before this returns; the
/// VM itself and guest RAM go to the teardown thread ([`crate::teardown`]).
pub fn run_on_this_thread(
    guest_elf: &[u8],
    call: &Call,
    devices: &[Device<'_>],
    config: &Config,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<RawOutcome, Error> {
    memory::check_ram_size(config.ram_size)?;
    if devices.len() > MAX_DEVICES {
        return Err(Error::Config(format!(
            "{} devices, at most {MAX_DEVICES} are supported",
            devices.len()
        )));
    }

    // Devices first: the call carries their exact sizes.
    let mut blk = Vec::with_capacity(devices.len());
    let mut call = call.clone();
    call.device_sizes.clear();
    for (i, dev) in devices.iter().enumerate() {
        let backing = backing(i, dev)?;
        let len = dev
            .file
            .metadata()
            .map_err(Error::setup("reading a device file's size"))?
            .len();
        call.device_sizes.push(len);
        let cap = crate::write_cap(len, &call, config.virtual_size);
        blk.push(BlockDevice::new(i, backing, len, dev.writable, cap));
    }

    // Workers for large reads start now, so that they confine themselves while the VM
    // is built; only for calls that copy image data, from images large enough to split.
    let device_fds: Vec<i32> = blk.iter().map(|d| d.fd()).collect();
    let pool =
        if moves_bulk_data(&call) && blk.iter().any(|d| d.len() >= io_pool::PARALLEL_MIN as u64) {
            IoPool::start(io_pool::WORKERS, &seccomp::build_io_worker(&device_fds)?)?
        } else {
            IoPool::inline()
        };

    let host = host()?;
    // Declared before the VM so that it is unmapped after the VM is closed.
    let mem: GuestMemory = memory::create(config.ram_size)?;
    let vm = host
        .kvm
        .create_vm()
        .map_err(|e| Error::setup("KVM_CREATE_VM")(e.into()))?;
    memory::write_tables(&mem, config.ram_size)?;
    let entry = crate::elf::load(&mem, config.ram_size, guest_elf)?;

    let mut request = vec![0u8; REQUEST_SIZE];
    instar_abi::encode(&call, &mut request)
        .map_err(|e| Error::Config(format!("the request does not fit the sandbox: {e}")))?;
    let written = mem.write_slice(&request, GuestAddress(REQUEST_ADDR));
    // The request may carry a passphrase: no host copy outlives this point.
    zeroize::Zeroize::zeroize(&mut request);
    written.map_err(|e| Error::Config(format!("cannot write the request: {e}")))?;

    let ram = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| Error::Config(format!("guest RAM has no host address: {e}")))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: config.ram_size,
        userspace_addr: ram as u64,
    };
    // SAFETY: the region is the live mapping owned by `mem`, which outlives the VM: it
    // is dropped after `vm`, here on an error or by the teardown thread.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| Error::setup("KVM_SET_USER_MEMORY_REGION")(e.into()))?;

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| Error::setup("KVM_CREATE_VCPU")(e.into()))?;
    setup_vcpu(&host.cpuid, &vcpu, entry, config.ram_size)?;

    let result = confine_and_run(
        &mut vcpu,
        &mem,
        &mut blk,
        &pool,
        &device_fds,
        config,
        on_progress,
    );
    // Tell the worker to stop first, so that it exits while the VM is handed over.
    pool.stop();
    teardown::later((vcpu, vm, mem));
    drop(pool);
    result
}

/// Confine the thread and run the guest until it answers or fails.
fn confine_and_run(
    vcpu: &mut VcpuFd,
    mem: &GuestMemory,
    blk: &mut [BlockDevice<'_>],
    pool: &IoPool,
    device_fds: &[i32],
    config: &Config,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<RawOutcome, Error> {
    let deadline = config.deadline.unwrap_or_else(|| {
        let bytes = blk.iter().fold(0u64, |sum, d| sum.saturating_add(d.len()));
        crate::default_deadline(bytes, config.virtual_size)
    });
    let watchdog = Watchdog::new(vcpu.get_kvm_run(), config.watchdog, deadline)?;
    let writable_fds: Vec<i32> = blk
        .iter()
        .filter(|d| d.writable())
        .map(|d| d.fd())
        .collect();
    let program = seccomp::build(&seccomp::Allowed {
        vcpu_fd: vcpu.as_raw_fd(),
        device_fds,
        writable_fds: &writable_fds,
    })?;
    // Everything the loop needs is allocated before the filter goes on.
    let mut doorbells = Doorbells {
        response: vec![0u8; RESPONSE_SIZE],
        write_phase: false,
        write_end_high: 0,
    };
    let mut writes = WriteCount {
        stop_after: config.stop_after_writes,
        log: config.record_writes.then(|| Vec::with_capacity(4096)),
        ..WriteCount::default()
    };
    seccomp::apply(&program)?;

    let exit = loop {
        // Only the watchdog sets immediate_exit, and then the loop ends: no reset needed.
        watchdog.entering_guest();
        let result = vcpu.run();
        if result.is_ok() {
            watchdog.guest_exited();
        }
        let step = match result {
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if addr == DOORBELL_ADDR {
                    match <[u8; 8]>::try_from(data) {
                        Ok(b) => {
                            let v = u64::from_le_bytes(b);
                            doorbells.ring((v >> 32) as u32, v as u32, mem, blk, on_progress)
                        }
                        Err(_) => Step::Fault(format!("doorbell write of {} bytes", data.len())),
                    }
                } else if let Some((dev, off)) = virtio_target(blk, addr) {
                    let served = dev.mmio_write(off, data, mem, pool, &mut writes);
                    if writes.stopped {
                        return Err(Error::StoppedAfterWrites(writes.done));
                    }
                    match served {
                        Ok(()) => Step::Continue,
                        Err(why) => Step::Fault(why),
                    }
                } else {
                    Step::Fault(format!("write to unmapped address {addr:#x}"))
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if let Some((dev, off)) = virtio_target(blk, addr) {
                    dev.mmio_read(off, data);
                    Step::Continue
                } else {
                    Step::Fault(format!("read from unmapped address {addr:#x}"))
                }
            }
            Ok(VcpuExit::Shutdown) => Step::Fault("triple fault".into()),
            Ok(VcpuExit::Hlt) => Step::Fault("unexpected hlt".into()),
            Ok(VcpuExit::InternalError) => Step::Fault("KVM internal error".into()),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Step::Fault(format!("VM entry failed (reason {reason:#x})"))
            }
            Ok(other) => Step::Fault(format!("unexpected VM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                if watchdog.deadline_passed() {
                    return Err(Error::Deadline(deadline));
                }
                if watchdog.fired() {
                    return Err(Error::Watchdog(config.watchdog));
                }
                Step::Continue
            }
            Err(e) => return Err(Error::Run(e.into())),
        };
        match step {
            Step::Continue => {}
            Step::Finish(exit) => break exit,
            Step::Fault(what) => return Err(fault_at(vcpu, &what)),
        }
    };
    Ok(RawOutcome {
        exit,
        write_phase: doorbells.write_phase,
        writes: writes.done,
        io_log: writes.log.unwrap_or_default(),
    })
}

/// The doorbell's state over a run.
struct Doorbells {
    /// Where the response area is copied (allocated before the filter goes on).
    response: Vec<u8>,
    write_phase: bool,
    /// The high half of the write end the next WRITE_PHASE declares.
    write_end_high: u32,
}

impl Doorbells {
    /// Serve the doorbell `code` with `arg`.
    fn ring(
        &mut self,
        code: u32,
        arg: u32,
        mem: &GuestMemory,
        blk: &mut [BlockDevice<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Step {
        match code {
            DOORBELL_DONE | DOORBELL_PANIC => {
                if mem
                    .read_slice(&mut self.response, GuestAddress(RESPONSE_ADDR))
                    .is_err()
                {
                    return Step::Fault("cannot read the response area".into());
                }
                let area = std::mem::take(&mut self.response);
                Step::Finish(if code == DOORBELL_DONE {
                    RawExit::Done(area)
                } else {
                    RawExit::Panic(area)
                })
            }
            DOORBELL_PROGRESS => {
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::reached(crate::test_hooks::Site::Vcpu);
                on_progress(arg);
                Step::Continue
            }
            DOORBELL_WRITE_END_HIGH | DOORBELL_WRITE_PHASE if self.write_phase => {
                Step::Fault("the guest announced its write phase twice".into())
            }
            DOORBELL_WRITE_END_HIGH => {
                self.write_end_high = arg;
                Step::Continue
            }
            DOORBELL_WRITE_PHASE => {
                self.write_phase = true;
                let end = u64::from(self.write_end_high) << 32 | u64::from(arg);
                for dev in blk.iter_mut() {
                    dev.start_writes(end);
                }
                Step::Continue
            }
            _ => Step::Fault(format!("unknown doorbell code {code}")),
        }
    }
}

/// The device whose MMIO window holds `addr`, and the offset inside it.
fn virtio_target<'d, 'a>(
    devices: &'d mut [BlockDevice<'a>],
    addr: u64,
) -> Option<(&'d mut BlockDevice<'a>, u64)> {
    let rel = addr.checked_sub(VIRTIO_MMIO_BASE)?;
    let index = usize::try_from(rel / VIRTIO_MMIO_STRIDE).ok()?;
    let dev = devices.get_mut(index)?;
    Some((dev, rel % VIRTIO_MMIO_STRIDE))
}
