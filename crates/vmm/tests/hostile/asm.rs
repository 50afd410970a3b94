//! Hand-assembled hostile guests: a little x86-64 code (it runs at CPL0, where
//! kvm-pvm emulates it) over data the test lays out in the image itself: virtqueues,
//! descriptor tables, request headers and the response to send.

use instar_abi::layout::{DOORBELL_ADDR, DOORBELL_DONE, RESPONSE_ADDR, VIRTIO_MMIO_BASE};
use instar_abi::{encode, Response};

/// Where the image is loaded; the code starts one page in.
pub const LOAD: u64 = 0x10_0000;
const CODE: u64 = LOAD + 0x1000;
/// The queue of device 0 (256 entries), request headers and status bytes, the response.
pub const DESC: u64 = LOAD + 0x1_0000;
pub const AVAIL: u64 = LOAD + 0x1_1000;
pub const USED: u64 = LOAD + 0x1_2000;
pub const HDR: u64 = LOAD + 0x1_3000;
pub const STATUS: u64 = LOAD + 0x1_3800;
const RESP: u64 = LOAD + 0x1_4000;
/// Data buffers.
pub const BUF: u64 = LOAD + 0x2_0000;
/// Room for an indirect table of 65,535 entries.
pub const IND: u64 = LOAD + 0x10_0000;
const SIZE: u64 = 0x21_0000;

pub const QUEUE_SIZE: u16 = 256;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;

// virtio-mmio registers.
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_MAGIC: u64 = 0x000;
pub const DOORBELL_PROGRESS: u32 = 3;

/// A guest under construction: its memory image and its code.
pub struct Guest {
    seg: Vec<u8>,
    code: Vec<u8>,
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            seg: vec![0; SIZE as usize],
            code: Vec::new(),
        }
    }
}

impl Guest {
    // ---- data ----

    pub fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = (addr - LOAD) as usize;
        self.seg[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Descriptor `i` of the table at `table`.
    pub fn desc(&mut self, table: u64, i: u32, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d);
    }

    /// A request header of `t` at `sector`, at `addr`.
    pub fn header(&mut self, addr: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(addr, &h);
    }

    /// Avail ring slot `k` holds `head`.
    pub fn avail(&mut self, k: u16, head: u16) {
        self.put(AVAIL + 4 + 2 * u64::from(k), &head.to_le_bytes());
    }

    /// The avail ring's index.
    pub fn avail_idx(&mut self, idx: u16) {
        self.put(AVAIL + 2, &idx.to_le_bytes());
    }

    // ---- code ----

    /// Raw machine code.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn mov_rbx(&mut self, v: u64) {
        self.code.extend_from_slice(&[0x48, 0xbb]);
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    fn mov_rax(&mut self, v: u64) {
        self.code.extend_from_slice(&[0x48, 0xb8]);
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    /// `mov dword [addr], v`.
    pub fn store32(&mut self, addr: u64, v: u32) {
        self.mov_rbx(addr);
        self.code.push(0xb8);
        self.code.extend_from_slice(&v.to_le_bytes());
        self.code.extend_from_slice(&[0x89, 0x03]);
    }

    /// Write device 0's register `reg`.
    pub fn reg(&mut self, reg: u64, v: u32) {
        self.store32(VIRTIO_MMIO_BASE + reg, v);
    }

    /// Ring the doorbell.
    pub fn ring(&mut self, code: u32, arg: u32) {
        self.mov_rbx(DOORBELL_ADDR);
        self.mov_rax(u64::from(code) << 32 | u64::from(arg));
        self.code.extend_from_slice(&[0x48, 0x89, 0x03]);
    }

    /// PROGRESS with the `bytes`-wide value at `addr` (1, 2 or 4).
    pub fn report(&mut self, addr: u64, bytes: u8) {
        self.mov_rbx(addr);
        match bytes {
            1 => self.code.extend_from_slice(&[0x0f, 0xb6, 0x03]), // movzx eax, byte [rbx]
            2 => self.code.extend_from_slice(&[0x0f, 0xb7, 0x03]), // movzx eax, word [rbx]
            _ => self.code.extend_from_slice(&[0x8b, 0x03]),       // mov eax, [rbx]
        }
        // mov rdx, PROGRESS << 32; or rax, rdx; mov rbx, DOORBELL; mov [rbx], rax
        self.code.extend_from_slice(&[0x48, 0xba]);
        self.code
            .extend_from_slice(&(u64::from(DOORBELL_PROGRESS) << 32).to_le_bytes());
        self.code.extend_from_slice(&[0x48, 0x09, 0xd0]);
        self.mov_rbx(DOORBELL_ADDR);
        self.code.extend_from_slice(&[0x48, 0x89, 0x03]);
    }

    /// Program device 0's queue (256 entries at DESC/AVAIL/USED) and make it ready.
    pub fn setup_queue(&mut self) {
        self.reg(REG_STATUS, 0);
        self.reg(REG_STATUS, 1 | 2 | 8 | 4);
        self.reg(REG_QUEUE_SEL, 0);
        self.reg(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.reg(REG_QUEUE_DESC_LOW, DESC as u32);
        self.reg(REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        self.reg(REG_QUEUE_DEVICE_LOW, USED as u32);
        self.reg(REG_QUEUE_READY, 1);
    }

    pub fn notify(&mut self) {
        self.reg(REG_QUEUE_NOTIFY, 0);
    }

    /// Report the used index, then each of the first `n` used lengths.
    pub fn report_used(&mut self, n: u64) {
        self.report(USED + 2, 2);
        for k in 0..n {
            self.report(USED + 4 + 8 * k + 4, 4);
        }
    }

    /// Run `body` forever.
    pub fn forever(&mut self, body: impl FnOnce(&mut Guest)) {
        let start = self.code.len();
        body(self);
        let after = self.code.len() + 5;
        let rel = start as i64 - after as i64;
        self.code.push(0xe9);
        self.code.extend_from_slice(&(rel as i32).to_le_bytes());
    }

    /// Answer `Response::SelfTest(value)` and stop.
    pub fn answer(&mut self, value: u64) {
        self.respond(&Response::SelfTest(value));
    }

    /// Answer `response` and stop.
    pub fn respond(&mut self, response: &Response) {
        let mut area = vec![0u8; 0x1000];
        encode(response, &mut area).unwrap();
        let len = 4 + u64::from(u32::from_le_bytes([area[0], area[1], area[2], area[3]]));
        self.put(RESP, &area[..len as usize]);
        // mov rsi, RESP; mov rdi, RESPONSE_ADDR; mov rcx, len; rep movsb
        self.code.extend_from_slice(&[0x48, 0xbe]);
        self.code.extend_from_slice(&RESP.to_le_bytes());
        self.code.extend_from_slice(&[0x48, 0xbf]);
        self.code.extend_from_slice(&RESPONSE_ADDR.to_le_bytes());
        self.code.extend_from_slice(&[0x48, 0xb9]);
        self.code.extend_from_slice(&len.to_le_bytes());
        self.code.extend_from_slice(&[0xf3, 0xa4]);
        self.ring(DOORBELL_DONE, 0);
        self.code.extend_from_slice(&[0xeb, 0xfe]);
    }

    /// The guest as a static ELF: one PT_LOAD segment at [`LOAD`] with everything.
    pub fn elf(mut self) -> Vec<u8> {
        assert!(self.code.len() < (DESC - CODE) as usize, "code too long");
        let code = std::mem::take(&mut self.code);
        self.put(CODE, &code);
        let mut e = Vec::new();
        e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        e.extend_from_slice(&2u16.to_le_bytes()); // EXEC
        e.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&CODE.to_le_bytes()); // entry
        e.extend_from_slice(&64u64.to_le_bytes()); // phoff
        e.extend_from_slice(&0u64.to_le_bytes()); // shoff
        e.extend_from_slice(&0u32.to_le_bytes()); // flags
        e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
        e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
        e.extend_from_slice(&1u16.to_le_bytes()); // phnum
        e.extend_from_slice(&[0; 6]);
        e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e.extend_from_slice(&7u32.to_le_bytes()); // RWX
        e.extend_from_slice(&0u64.to_le_bytes()); // offset
        e.extend_from_slice(&LOAD.to_le_bytes());
        e.extend_from_slice(&LOAD.to_le_bytes());
        e.extend_from_slice(&SIZE.to_le_bytes());
        e.extend_from_slice(&SIZE.to_le_bytes());
        e.extend_from_slice(&0x1000u64.to_le_bytes());
        self.seg[..e.len()].copy_from_slice(&e);
        self.seg
    }
}
