//! Structure-aware mutations. Most mutations go to a field the parsers read (see
//! [`crate::layout`]): an interesting value, a small step, another structure's offset
//! (with the flag bits the tables use), or a copy of another field (two entries naming
//! one table). The rest are byte-level: flips, interesting integers at any offset,
//! chunk copies, truncation, growth, splices from other seeds, and line edits of
//! descriptor text.

use alloc::vec::Vec;

use crate::layout::{layout, Field, Layout};
use crate::rng::Rng;

/// Largest image a mutation grows to.
const MAX_LEN: usize = 4 << 20;

const INTERESTING: [u64; 24] = [
    0,
    1,
    2,
    7,
    8,
    9,
    16,
    21,
    22,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x200,
    0x1ff,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Flag bits of L1/L2/refcount entries: COPIED, COMPRESSED, ZERO, and none.
const ENTRY_FLAGS: [u64; 4] = [0, 1 << 63, 1 << 62, 1];

/// Mutate one image in place, `1..=4` stacked mutations.
pub fn mutate(rng: &mut Rng, d: &mut Vec<u8>, others: &[Vec<u8>]) {
    let lay = layout(d);
    for _ in 0..=rng.below(4) {
        match rng.below(10) {
            0..=5 if !lay.fields.is_empty() => field(rng, d, &lay),
            6 if lay.text.is_some() => text(rng, d, &lay),
            _ => bytes(rng, d, others),
        }
    }
}

fn read(d: &[u8], f: Field) -> u64 {
    let b = &d[f.off..f.off + usize::from(f.width)];
    if f.le {
        b.iter().rev().fold(0, |a, &x| (a << 8) | u64::from(x))
    } else {
        b.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
    }
}

fn write(d: &mut [u8], f: Field, v: u64) {
    let w = usize::from(f.width);
    for i in 0..w {
        let shift = 8 * if f.le { i } else { w - 1 - i };
        d[f.off + i] = (v >> shift) as u8;
    }
}

fn field(rng: &mut Rng, d: &mut [u8], lay: &Layout) {
    let Some(&f) = rng.pick(&lay.fields) else {
        return;
    };
    if f.off + usize::from(f.width) > d.len() {
        return;
    }
    let old = read(d, f);
    let v = match rng.below(8) {
        0 | 1 => INTERESTING[rng.index(INTERESTING.len())],
        2 => old.wrapping_add(1 + rng.below(16)),
        3 => old.wrapping_sub(1 + rng.below(16)),
        4 | 5 => {
            let off = lay
                .offsets
                .get(rng.index(lay.offsets.len()))
                .copied()
                .unwrap_or(0);
            let units = (off / lay.unit.max(1)).wrapping_add(rng.below(3));
            units | ENTRY_FLAGS[rng.index(ENTRY_FLAGS.len())] & mask(f.width)
        }
        6 => lay.fields.get(rng.index(lay.fields.len())).map_or(0, |g| {
            if g.off + usize::from(g.width) <= d.len() {
                read(d, *g)
            } else {
                0
            }
        }),
        _ => old ^ (1 << rng.below(u64::from(f.width) * 8)),
    };
    write(d, f, v);
}

fn mask(width: u8) -> u64 {
    if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(width))) - 1
    }
}

fn bytes(rng: &mut Rng, d: &mut Vec<u8>, others: &[Vec<u8>]) {
    if d.is_empty() {
        d.extend_from_slice(&[0; 64]);
    }
    let n = d.len();
    match rng.below(8) {
        0 => {
            let i = rng.index(n);
            d[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.index(n);
            d[i] = rng.next_u64() as u8;
        }
        2 => {
            let width = 1u8 << rng.below(4);
            let off = rng.index(n);
            if off + usize::from(width) <= n {
                let f = Field {
                    off,
                    width,
                    le: rng.one_in(2),
                };
                write(d, f, INTERESTING[rng.index(INTERESTING.len())]);
            }
        }
        3 => {
            // Copy a chunk over another place (a table over a table, a header over data).
            let len = 1 + rng.index(n.min(4096));
            let (src, dst) = (rng.index(n - len + 1), rng.index(n - len + 1));
            d.copy_within(src..src + len, dst);
        }
        4 => d.truncate(rng.index(n)),
        5 if n < MAX_LEN => {
            let grow = 1 + rng.index(64 << 10);
            let fill = if rng.one_in(2) {
                0
            } else {
                rng.next_u64() as u8
            };
            d.resize((n + grow).min(MAX_LEN), fill);
        }
        6 => {
            if let Some(o) = others
                .get(rng.index(others.len()))
                .filter(|o| !o.is_empty())
            {
                let len = 1 + rng.index(o.len().min(8192));
                let src = rng.index(o.len() - len + 1);
                let dst = rng.index(n);
                let end = (dst + len).min(n);
                d[dst..end].copy_from_slice(&o[src..src + (end - dst)]);
            }
        }
        _ => {
            let i = rng.index(n);
            let len = (1 + rng.index(32)).min(n - i);
            d[i..i + len].fill(if rng.one_in(2) { 0 } else { 0xff });
        }
    }
}

/// Lines a descriptor may hold, for insertion.
const LINES: [&[u8]; 12] = [
    b"version=1",
    b"version=3",
    b"CID=fffffffe",
    b"parentCID=ffffffff",
    b"createType=\"monolithicSparse\"",
    b"createType=\"monolithicFlat\"",
    b"createType=\"streamOptimized\"",
    b"parentFileNameHint=\"base.vmdk\"",
    b"parentFileNameHint=\"/etc/shadow\"",
    b"RW 2048 SPARSE \"x.vmdk\"",
    b"RW 4294967296 FLAT \"/dev/sda\" 0",
    b"ddb.adapterType = \"ide\"",
];

/// Edit the text region line by line; a region inside a binary file keeps its length.
fn text(rng: &mut Rng, d: &mut Vec<u8>, lay: &Layout) {
    let Some((start, len)) = lay.text else {
        return;
    };
    let Some(end) = start.checked_add(len).filter(|&e| e <= d.len()) else {
        return;
    };
    let region = &d[start..end];
    let body_len = region.iter().position(|&c| c == 0).unwrap_or(region.len());
    let mut lines: Vec<Vec<u8>> = region[..body_len]
        .split(|&c| c == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    edit_lines(rng, &mut lines);
    let mut new = lines.join(&b'\n');
    let whole_file = start == 0 && end == d.len();
    if whole_file {
        *d = new;
    } else {
        new.resize(len, 0);
        d[start..end].copy_from_slice(&new);
    }
}

fn edit_lines(rng: &mut Rng, lines: &mut Vec<Vec<u8>>) {
    let n = lines.len().max(1);
    let i = rng.index(n).min(lines.len().saturating_sub(1));
    match rng.below(7) {
        0 if !lines.is_empty() => {
            lines.remove(i);
        }
        1 if !lines.is_empty() => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 => lines.insert(i.min(lines.len()), LINES[rng.index(LINES.len())].to_vec()),
        3 if !lines.is_empty() => {
            // A number in the line becomes an interesting one (decimal or hex).
            let v = INTERESTING[rng.index(INTERESTING.len())];
            let digits = if rng.one_in(2) {
                alloc::format!("{v}")
            } else {
                alloc::format!("{v:x}")
            };
            replace_number(&mut lines[i], digits.as_bytes());
        }
        4 if !lines.is_empty() => {
            // A quoted string becomes empty, long, or unterminated.
            let fill: Vec<u8> = match rng.below(3) {
                0 => Vec::new(),
                1 => alloc::vec![b'a'; 1 + rng.index(5000)],
                _ => b"\"unterminated".to_vec(),
            };
            replace_quoted(&mut lines[i], &fill);
        }
        5 if !lines.is_empty() => {
            let pos = rng.index(lines[i].len() + 1);
            let b = [0u8, b'\r', b'"', b'=', b' ', 0xff][rng.index(6)];
            lines[i].insert(pos, b);
        }
        _ if lines.len() > 1 => {
            let j = rng.index(lines.len());
            lines.swap(i, j);
        }
        _ => {}
    }
}

fn replace_number(line: &mut Vec<u8>, digits: &[u8]) {
    let Some(start) = line.iter().position(u8::is_ascii_hexdigit) else {
        return;
    };
    let end = line[start..]
        .iter()
        .position(|c| !c.is_ascii_hexdigit())
        .map_or(line.len(), |p| start + p);
    line.splice(start..end, digits.iter().copied());
}

fn replace_quoted(line: &mut Vec<u8>, fill: &[u8]) {
    let Some(a) = line.iter().position(|&c| c == b'"') else {
        return;
    };
    let b = line[a + 1..]
        .iter()
        .position(|&c| c == b'"')
        .map_or(line.len(), |p| a + 1 + p);
    line.splice(a + 1..b, fill.iter().copied());
}
