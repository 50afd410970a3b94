//! Where the fields of an image (qcow2, qed, vmdk) are, so that mutations hit what the parsers read:
//! header fields, table entries (L1, L2, refcount table and blocks, snapshot L1s, vmdk
//! grain directory and tables), snapshot table fields, extension headers, and the
//! offsets of structures (to point one structure at another).

use alloc::vec::Vec;

/// One integer field: byte offset, width in bytes, byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub off: usize,
    pub width: u8,
    pub le: bool,
}

/// What the mutator knows about one image.
#[derive(Debug, Default, Clone)]
pub struct Layout {
    pub fields: Vec<Field>,
    /// Offsets (bytes) of structures in the file: useful values for pointer fields.
    pub offsets: Vec<u64>,
    /// `(start, len)` of text the parser reads (vmdk descriptor, backing name).
    pub text: Option<(usize, usize)>,
    /// Multiplier for offsets in pointer fields (512 for vmdk sectors, 1 for qcow2).
    pub unit: u64,
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
const VMDK_MAGIC: &[u8] = b"KDMV";
const QED_MAGIC: &[u8] = b"QED\0";
/// How many entries of each table get fields (bounds the layout's cost).
const ENTRIES: usize = 48;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn bytes(d: &[u8], off: u64, width: usize) -> Option<&[u8]> {
    let off = usize::try_from(off).ok()?;
    d.get(off..off.checked_add(width)?)
}

fn be(d: &[u8], off: u64, width: usize) -> u64 {
    bytes(d, off, width).map_or(0, |b| b.iter().fold(0, |a, &x| (a << 8) | u64::from(x)))
}

fn le(d: &[u8], off: u64, width: usize) -> u64 {
    bytes(d, off, width).map_or(0, |b| {
        b.iter().rev().fold(0, |a, &x| (a << 8) | u64::from(x))
    })
}

impl Layout {
    fn field(&mut self, len: usize, off: u64, width: u8, le: bool) {
        if let Ok(off) = usize::try_from(off) {
            if off
                .checked_add(usize::from(width))
                .is_some_and(|e| e <= len)
            {
                self.fields.push(Field { off, width, le });
            }
        }
    }

    /// `count` entries of `width` bytes from `off`.
    fn table(&mut self, len: usize, off: u64, count: u64, width: u8, le: bool) {
        for i in 0..count.min(ENTRIES as u64) {
            self.field(len, off.saturating_add(i * u64::from(width)), width, le);
        }
    }
}

/// The layout of `d`: qcow2, vmdk sparse, a vmdk descriptor file, or nothing known.
pub fn layout(d: &[u8]) -> Layout {
    if d.starts_with(QCOW2_MAGIC) {
        qcow2(d)
    } else if d.starts_with(QED_MAGIC) {
        qed(d)
    } else if d.starts_with(VMDK_MAGIC) {
        vmdk(d)
    } else if d.starts_with(b"# Disk DescriptorFile") {
        Layout {
            text: Some((0, d.len())),
            unit: 512,
            ..Layout::default()
        }
    } else {
        Layout {
            unit: 1,
            ..Layout::default()
        }
    }
}

const QCOW2_HEADER: [(u64, u8); 19] = [
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
    (105, 3),
];

fn qcow2(d: &[u8]) -> Layout {
    let n = d.len();
    let mut l = Layout {
        unit: 1,
        ..Layout::default()
    };
    for (off, w) in QCOW2_HEADER {
        l.field(n, off, w, false);
    }
    let cb = be(d, 20, 4);
    if !(9..=21).contains(&cb) {
        return l;
    }
    let cs = 1u64 << cb;
    let version = be(d, 4, 4);
    let extl2 = be(d, 72, 8) & (1 << 4) != 0;
    let l2_width: u64 = if extl2 { 16 } else { 8 };
    let l1_off = be(d, 40, 8);
    let l1_n = be(d, 36, 4);
    l.offsets.extend([0, cs, l1_off, n as u64]);
    l.table(n, l1_off, l1_n, 8, false);
    for i in 0..l1_n.min(8) {
        let l2 = be(d, l1_off.saturating_add(8 * i), 8) & OFFSET_MASK;
        if l2 != 0 {
            l.offsets.push(l2);
            l.table(n, l2, cs / 8, 8, false);
            l2_data_offsets(&mut l, d, l2, cs / l2_width, l2_width);
        }
    }
    refcounts(&mut l, d, cs);
    snapshots(&mut l, d);
    extensions(&mut l, d, version);
    let (bf_off, bf_len) = (be(d, 8, 8), be(d, 16, 4));
    if bf_off > 0 && bf_off.saturating_add(bf_len) <= n as u64 {
        l.text = Some((bf_off as usize, bf_len as usize));
    }
    l
}

fn l2_data_offsets(l: &mut Layout, d: &[u8], l2: u64, entries: u64, width: u64) {
    for j in 0..entries.min(ENTRIES as u64) {
        let e = be(d, l2.saturating_add(j * width), 8);
        if e & OFFSET_MASK != 0 {
            l.offsets.push(e & OFFSET_MASK);
            if width == 16 {
                l.field(d.len(), l2.saturating_add(j * width + 8), 8, false);
            }
        }
    }
}

fn refcounts(l: &mut Layout, d: &[u8], cs: u64) {
    let n = d.len();
    let rt = be(d, 48, 8);
    let rt_n = be(d, 56, 4).saturating_mul(cs / 8);
    l.offsets.push(rt);
    l.table(n, rt, rt_n, 8, false);
    let order = be(d, 96, 4);
    let width = if order <= 3 {
        1
    } else {
        1u8 << (order - 3).min(3)
    };
    for i in 0..rt_n.min(4) {
        let b = be(d, rt.saturating_add(8 * i), 8) & OFFSET_MASK;
        if b != 0 {
            l.offsets.push(b);
            l.table(n, b, cs / u64::from(width), width, false);
        }
    }
}

fn snapshots(l: &mut Layout, d: &[u8]) {
    let n = d.len();
    let mut p = be(d, 64, 8);
    l.offsets.push(p);
    for _ in 0..be(d, 60, 4).min(8) {
        for (o, w) in [(0, 8), (8, 4), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8)] {
            l.field(n, p.saturating_add(o), w, false);
        }
        for (o, w) in [(32, 4), (36, 4), (40, 8), (48, 8), (56, 8)] {
            l.field(n, p.saturating_add(o), w, false);
        }
        let sl1 = be(d, p, 8);
        l.offsets.push(sl1);
        l.table(n, sl1, be(d, p.saturating_add(8), 4), 8, false);
        let extra = be(d, p.saturating_add(36), 4);
        let names = be(d, p.saturating_add(12), 2) + be(d, p.saturating_add(14), 2);
        let next = p.saturating_add(40 + extra + names);
        p = next.saturating_add(7) & !7;
        if p >= n as u64 {
            break;
        }
    }
}

fn extensions(l: &mut Layout, d: &[u8], version: u64) {
    let n = d.len();
    let mut p = if version >= 3 { be(d, 100, 4) } else { 72 };
    for _ in 0..16 {
        l.field(n, p, 4, false);
        l.field(n, p.saturating_add(4), 4, false);
        let (ty, len) = (be(d, p, 4), be(d, p.saturating_add(4), 4));
        if ty == 0 || p >= n as u64 {
            break;
        }
        if ty == 0x2385_2875 {
            // Bitmaps: nb_bitmaps, reserved, directory size and offset.
            l.table(n, p.saturating_add(8), 2, 4, false);
            l.table(n, p.saturating_add(16), 2, 8, false);
        }
        p = p.saturating_add(8 + ((len + 7) & !7));
    }
}

/// qed: the header's fields (little-endian), the L1 table, the first L2 tables and
/// the data clusters they point to.
fn qed(d: &[u8]) -> Layout {
    let n = d.len();
    let mut l = Layout {
        unit: 1,
        ..Layout::default()
    };
    for (off, w) in [
        (4, 4),
        (8, 4),
        (12, 4),
        (16, 8),
        (24, 8),
        (32, 8),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
    ] {
        l.field(n, off, w, true);
    }
    let (cs, ts) = (le(d, 4, 4), le(d, 8, 4));
    if !cs.is_power_of_two() || !(4096..=1 << 26).contains(&cs) || !(1..=16).contains(&ts) {
        return l;
    }
    let entries = cs * ts / 8;
    let l1 = le(d, 40, 8);
    l.offsets.extend([0, cs, l1, n as u64]);
    l.table(n, l1, entries, 8, true);
    for i in 0..entries.min(8) {
        let l2 = le(d, l1.saturating_add(8 * i), 8);
        if l2 > 1 {
            l.offsets.push(l2);
            l.table(n, l2, entries, 8, true);
            for j in 0..entries.min(ENTRIES as u64) {
                let e = le(d, l2.saturating_add(8 * j), 8);
                if e > 1 {
                    l.offsets.push(e);
                }
            }
        }
    }
    let (bf_off, bf_len) = (le(d, 56, 4), le(d, 60, 4));
    if bf_off > 0 && bf_off.saturating_add(bf_len) <= n as u64 {
        l.text = Some((bf_off as usize, bf_len as usize));
    }
    l
}

fn vmdk(d: &[u8]) -> Layout {
    let n = d.len();
    let mut l = Layout {
        unit: 512,
        ..Layout::default()
    };
    for (off, w) in [
        (4, 4),
        (8, 4),
        (12, 8),
        (20, 8),
        (28, 8),
        (36, 8),
        (44, 4),
        (48, 8),
        (56, 8),
        (64, 8),
        (72, 1),
        (77, 2),
    ] {
        l.field(n, off, w, true);
    }
    let (desc, desc_n) = (le(d, 28, 8), le(d, 36, 8));
    if desc > 0 && desc.saturating_add(desc_n).saturating_mul(512) <= n as u64 {
        l.text = Some(((desc * 512) as usize, (desc_n * 512) as usize));
    }
    let gtes = le(d, 44, 4);
    for gd in [le(d, 56, 8), le(d, 48, 8)] {
        let gd_b = gd.saturating_mul(512);
        l.offsets.push(gd);
        l.table(n, gd_b, ENTRIES as u64, 4, true);
        for i in 0..4u64 {
            let gt = le(d, gd_b.saturating_add(4 * i), 4);
            if gt != 0 {
                l.offsets.push(gt);
                l.table(n, gt.saturating_mul(512), gtes, 4, true);
            }
        }
    }
    l.offsets.extend([0, 1, le(d, 64, 8), (n as u64) / 512]);
    l
}
