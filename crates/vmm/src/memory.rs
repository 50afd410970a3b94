//! Guest RAM and the fixed structures the VMM writes into it: GDT and identity page
//! tables (see [`instar_abi::layout`]).

use instar_abi::layout::{
    DOORBELL_ADDR, GDT_ADDR, GUEST_LOAD_ADDR, MAX_DEVICES, PAGE_TABLES_ADDR, PAGE_TABLES_END,
    VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::Error;

pub type GuestMemory = GuestMemoryMmap<()>;

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// RAM must stay below the MMIO window at 3 GiB; the page-table area holds two page
/// directories for RAM, so 2 GiB is the limit.
pub const MAX_RAM: u64 = 2 * GIB;
/// Enough for the guest image, its stack and a useful heap.
pub const MIN_RAM: u64 = 16 << 20;

/// GDT selectors. The guest's boot stub uses the user ones (guest/src/boot.rs).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// Descriptors: null, kernel code64, kernel data, user data, user code64.
const GDT: [u64; 5] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
];
pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
/// Every mapping is user-accessible: all guest Rust code runs at CPL3.
const PTE_RW_USER: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

const PML4: u64 = PAGE_TABLES_ADDR;
const PDPT: u64 = PAGE_TABLES_ADDR + 0x1000;
/// Page directories for RAM in [0, 1 GiB) and [1 GiB, 2 GiB).
const PD_RAM: [u64; 2] = [PAGE_TABLES_ADDR + 0x2000, PAGE_TABLES_ADDR + 0x3000];
/// Page directory for [3 GiB, 4 GiB): the doorbell and the virtio-mmio devices.
const PD_MMIO: u64 = PAGE_TABLES_ADDR + 0x4000;
/// 4 KiB page table for the first 2 MiB, so that page 0 can stay unmapped.
const PT_LOW: u64 = PAGE_TABLES_ADDR + 0x5000;
const _: () = assert!(PT_LOW + 0x1000 <= PAGE_TABLES_END);
/// Unmapped page right below the guest image.
pub const STACK_GUARD: u64 = GUEST_LOAD_ADDR - 0x1000;

/// Check a RAM size the caller asked for.
pub fn check_ram_size(size: u64) -> Result<(), Error> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(MIB2) {
        return Err(Error::Config(format!(
            "guest RAM must be a multiple of 2 MiB between {} MiB and {} MiB, not {size} bytes",
            MIN_RAM >> 20,
            MAX_RAM >> 20
        )));
    }
    Ok(())
}

/// Anonymous, lazily backed guest RAM at guest-physical 0.
pub fn create(size: u64) -> Result<GuestMemory, Error> {
    check_ram_size(size)?;
    let region = MmapRegion::<()>::new(size as usize)
        .map_err(|e| Error::Config(format!("cannot map guest RAM: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::Config("guest RAM does not fit the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| Error::Config(format!("cannot set up guest RAM: {e}")))
}

fn write_table(mem: &GuestMemory, addr: u64, entries: &[u64]) -> Result<(), Error> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| Error::Config(format!("cannot write guest memory at {addr:#x}: {e}")))
}

/// Write the GDT and identity page tables: RAM (without page 0) and the MMIO window.
/// Each table is built here and written in one piece (one entry at a time through
/// vm-memory costs several times more).
pub fn write_tables(mem: &GuestMemory, ram_size: u64) -> Result<(), Error> {
    write_table(mem, GDT_ADDR, &GDT)?;

    let mmio_gib = DOORBELL_ADDR / GIB;
    let mut pdpt = [0u64; 512];
    pdpt[0] = PD_RAM[0] | PTE_RW_USER;
    pdpt[1] = PD_RAM[1] | PTE_RW_USER;
    pdpt[mmio_gib as usize] = PD_MMIO | PTE_RW_USER;
    write_table(mem, PML4, &[PDPT | PTE_RW_USER])?;
    write_table(mem, PDPT, &pdpt[..=mmio_gib as usize])?;

    // First 2 MiB in 4 KiB pages. Left out: page 0, so null dereferences fault, and
    // the page below the guest image, the guard page under the guest's stack
    // (guest/link.ld puts the stack at the start of the image).
    let mut pt_low = [0u64; 512];
    for (page, entry) in pt_low.iter_mut().enumerate().skip(1) {
        let page = page as u64;
        if page != STACK_GUARD >> 12 {
            *entry = (page << 12) | PTE_RW_USER;
        }
    }
    write_table(mem, PT_LOW, &pt_low)?;
    // The rest of RAM in 2 MiB pages.
    for (gib, &pd_addr) in PD_RAM.iter().enumerate() {
        let base = gib as u64 * GIB;
        if base >= ram_size {
            break;
        }
        let mut pd = [0u64; 512];
        for (index, entry) in pd.iter_mut().enumerate() {
            let addr = base + index as u64 * MIB2;
            if addr >= ram_size {
                break;
            }
            *entry = if addr == 0 {
                PT_LOW | PTE_RW_USER
            } else {
                addr | PTE_RW_USER | PTE_HUGE
            };
        }
        write_table(mem, pd_addr, &pd)?;
    }

    // MMIO: uncached 2 MiB pages over the doorbell and the virtio-mmio devices.
    let mmio_end = VIRTIO_MMIO_BASE + MAX_DEVICES as u64 * VIRTIO_MMIO_STRIDE;
    let mut pd_mmio = [0u64; 512];
    let mut pages = vec![DOORBELL_ADDR & !(MIB2 - 1)];
    pages.extend(((VIRTIO_MMIO_BASE & !(MIB2 - 1))..mmio_end).step_by(MIB2 as usize));
    for addr in pages {
        let index = ((addr % GIB) / MIB2) as usize;
        pd_mmio[index] = addr | PTE_RW_USER | PTE_HUGE | PTE_PCD | PTE_PWT;
    }
    write_table(mem, PD_MMIO, &pd_mmio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_sizes() {
        assert!(check_ram_size(instar_abi::layout::DEFAULT_RAM_SIZE).is_ok());
        assert!(check_ram_size(MAX_RAM).is_ok());
        assert!(check_ram_size(MAX_RAM + MIB2).is_err());
        assert!(check_ram_size(MIN_RAM - MIB2).is_err());
        assert!(check_ram_size(MIN_RAM + 4096).is_err());
    }

    #[test]
    fn page_zero_unmapped_and_ram_identity_mapped() {
        let size = 64 << 20;
        let mem = create(size).unwrap();
        write_tables(&mem, size).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(PT_LOW), 0);
        assert_eq!(read(PT_LOW + 8), 0x1000 | PTE_RW_USER);
        assert_eq!(read(PT_LOW + 8 * (STACK_GUARD >> 12)), 0);
        assert_ne!(read(PT_LOW + 8 * (GUEST_LOAD_ADDR >> 12)), 0);
        // Last 2 MiB page of RAM, and nothing past it.
        let last = (size - MIB2) / MIB2;
        assert_eq!(
            read(PD_RAM[0] + 8 * last),
            (size - MIB2) | PTE_RW_USER | PTE_HUGE
        );
        assert_eq!(read(PD_RAM[0] + 8 * (last + 1)), 0);
        // Doorbell page.
        assert_ne!(read(PD_MMIO) & PTE_PRESENT, 0);
    }

    #[test]
    fn all_of_the_largest_ram_is_identity_mapped() {
        let size = MAX_RAM;
        let mem = create(size).unwrap();
        write_tables(&mem, size).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(PML4), PDPT | PTE_RW_USER);
        assert_eq!(read(PDPT + 16), 0, "no RAM in the third GiB");
        for addr in (MIB2..size).step_by(MIB2 as usize) {
            let pd = read(PDPT + 8 * (addr / GIB)) & !0xfff;
            assert_eq!(
                read(pd + 8 * ((addr % GIB) / MIB2)),
                addr | PTE_RW_USER | PTE_HUGE,
                "{addr:#x}"
            );
        }
        // The doorbell and every device window are mapped uncached.
        let mmio = read(PDPT + 8 * (DOORBELL_ADDR / GIB)) & !0xfff;
        let end = VIRTIO_MMIO_BASE + MAX_DEVICES as u64 * VIRTIO_MMIO_STRIDE;
        for addr in [DOORBELL_ADDR, VIRTIO_MMIO_BASE, end - 1] {
            let e = read(mmio + 8 * ((addr % GIB) / MIB2));
            assert_eq!(
                e & (PTE_PCD | PTE_PWT | PTE_HUGE),
                PTE_PCD | PTE_PWT | PTE_HUGE
            );
            assert_eq!(e & !0x1f_ffff, addr & !0x1f_ffff);
        }
    }
}
