//! The repair QEMU runs when it opens a dirty image read-write (the DIRTY bit: lazy
//! refcounts were in use when the image was last closed uncleanly): its check with
//! error and leak fixing (`qcow2_check_refcounts` with `BDRV_FIX_ERRORS |
//! BDRV_FIX_LEAKS`), then clearing the bit with a full header rewrite.
//!
//! Planned entirely in memory: [`plan`] reads the image, computes every reference, and
//! returns the lines QEMU prints, the writes QEMU makes (in its order, with their final
//! content) and the header fields that change. Nothing is written here.
//!
//! Reproduced: references counted from the header, the active L1/L2 tables (standard
//! and compressed clusters), the refcount table and blocks; the first comparison
//! ("ERROR"/"Leaked" lines); in-place fixing when every mismatched cluster already
//! has a refcount ("Repairing" lines, refcount blocks patched); otherwise the rebuild
//! of the whole refcount structure (new blocks and table placed first fit by the
//! in-memory refcounts, exactly as QEMU allocates them), the recount and the freeing
//! (discard) of the old structure; then the COPIED flags of L1 and L2 entries.
//!
//! Refused (the repair would also rewrite other structures, or QEMU would fail):
//! internal snapshots, persistent bitmaps, encryption, external data files, extended
//! L2 entries, and any corruption other than a refcount mismatch or a COPIED flag
//! (reserved bits, unaligned tables or clusters, references past the end of the file,
//! refcount overflow, refcount blocks outside the file, a shared L2 table to rewrite).

mod copied;
mod counts;
mod rebuild;
mod walk;

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::{BlockDev, IoError};

use crate::header::INCOMPAT_DIRTY;
use crate::refcount::{refcount_entry, REFT_OFFSET_MASK};
use crate::Header;

use counts::Counts;

/// Why a dirty image cannot be repaired here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("device I/O failed: {0}")]
    Io(#[from] IoError),
}

fn unsupported<T>(why: &'static str) -> Result<T, RepairError> {
    Err(RepairError::Unsupported(why))
}

/// Most clusters the in-memory refcounts may cover (8 bytes each in the guest's heap).
const MAX_CLUSTERS: u64 = 2 << 20;
/// Most bytes of rewritten refcount structure the plan may hold.
const MAX_PATCH_BYTES: u64 = 64 << 20;

/// What QEMU says about a cluster whose refcount disagrees with its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Repairing,
    Error,
    Leaked,
}

impl Verdict {
    pub const fn word(self) -> &'static str {
        match self {
            Verdict::Repairing => "Repairing",
            Verdict::Error => "ERROR",
            Verdict::Leaked => "Leaked",
        }
    }
}

/// One line QEMU prints to stderr during the repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `{verdict} cluster {index} refcount={refcount} reference={reference}`
    Cluster {
        verdict: Verdict,
        index: u64,
        refcount: u64,
        reference: u64,
    },
    /// `ERROR refcount block {index} refcount={refcount}`
    BlockRefcount { index: u64, refcount: u64 },
    /// `Rebuilding refcount structure`
    Rebuilding,
    /// `Repairing OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x}
    /// refcount={refcount}`
    CopiedL2 {
        l1_index: u64,
        l1_entry: u64,
        refcount: u64,
    },
    /// `Repairing OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}`
    CopiedData { l2_entry: u64, refcount: u64 },
}

impl core::fmt::Display for Line {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Line::Cluster {
                verdict,
                index,
                refcount,
                reference,
            } => write!(
                f,
                "{} cluster {index} refcount={refcount} reference={reference}",
                verdict.word()
            ),
            Line::BlockRefcount { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            Line::Rebuilding => f.write_str("Rebuilding refcount structure"),
            Line::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
            } => write!(
                f,
                "Repairing OFLAG_COPIED L2 cluster: l1_index={l1_index} \
                 l1_entry={l1_entry:x} refcount={refcount}"
            ),
            Line::CopiedData { l2_entry, refcount } => write!(
                f,
                "Repairing OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}"
            ),
        }
    }
}

/// What a write of the plan holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairWriteKind {
    RefcountBlock,
    RefcountTable,
    /// The active L1 table (COPIED flags fixed).
    L1Table,
    /// An active L2 table (COPIED flags fixed).
    L2Table,
    /// The whole header cluster, rebuilt with the DIRTY bit cleared.
    Header,
}

/// One write of the plan, with its final content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairWrite {
    pub offset: u64,
    pub data: Vec<u8>,
    pub kind: RepairWriteKind,
}

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairPlan {
    /// The lines QEMU prints to stderr, in order.
    pub lines: Vec<Line>,
    /// Writes in QEMU's order; each range is written once, with its final content.
    pub writes: Vec<RepairWrite>,
    /// Clusters whose refcount the repair dropped to 0, as (offset, length) runs: QEMU
    /// discards them (`QCOW2_DISCARD_ALWAYS`), so they read as zeros afterwards. Made
    /// after [`RepairPlan::writes`]; they never overlap them.
    pub discards: Vec<(u64, u64)>,
    /// The header after the repair (DIRTY cleared, refcount table possibly moved).
    pub header: Header,
}

impl RepairPlan {
    /// Where the file ends once the plan is written (it never shrinks).
    pub fn end(&self, file_len: u64) -> u64 {
        self.writes
            .iter()
            .map(|w| w.offset + w.data.len() as u64)
            .fold(file_len, u64::max)
    }
}

/// The image's refcount structure as it stands (on the device, patched by the plan so
/// far): refcount table in memory, blocks read on demand and kept once changed.
pub(crate) struct Disk<'d, D: ?Sized> {
    dev: &'d mut D,
    pub(crate) cluster_bits: u32,
    pub(crate) order: u32,
    pub(crate) rt: Vec<u64>,
    /// Refcount blocks read, written or changed by the plan: offset → content.
    pub(crate) blocks: BTreeMap<u64, Vec<u8>>,
    /// Offsets of `blocks`, in first-write order.
    pub(crate) order_written: Vec<u64>,
    /// File length as the plan leaves it.
    pub(crate) file_len: u64,
    /// Freed clusters, as runs (see [`RepairPlan::discards`]).
    pub(crate) discards: Vec<(u64, u64)>,
}

impl<D: BlockDev + ?Sized> Disk<'_, D> {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of refcounts per block.
    pub(crate) fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    fn block(&mut self, off: u64) -> Result<&mut Vec<u8>, RepairError> {
        if !self.blocks.contains_key(&off) {
            let mut buf = vec![0u8; self.cs() as usize];
            self.dev.read_zero_padded(off, &mut buf)?;
            self.blocks.insert(off, buf);
        }
        self.blocks
            .get_mut(&off)
            .ok_or(RepairError::Unsupported("refcount block cache"))
    }

    fn block_of(&self, cluster: u64) -> Option<u64> {
        let ti = usize::try_from(cluster >> self.rb_bits()).ok()?;
        let off = self.rt.get(ti)? & REFT_OFFSET_MASK;
        (off != 0).then_some(off)
    }

    /// `qcow2_get_refcount`.
    pub(crate) fn get(&mut self, cluster: u64) -> Result<u64, RepairError> {
        let Some(off) = self.block_of(cluster) else {
            return Ok(0);
        };
        let idx = cluster & ((1 << self.rb_bits()) - 1);
        let order = self.order;
        // Blocks read stay in memory: at most the image's refcount structure, which
        // the cluster limit bounds (8 bytes of refcount per cluster at the widest).
        Ok(refcount_entry(self.block(off)?, idx, order))
    }

    /// Set an existing block's entry (QEMU's `update_refcount` through its cache).
    fn set(&mut self, cluster: u64, value: u64) -> Result<(), RepairError> {
        let Some(off) = self.block_of(cluster) else {
            return unsupported("a refcount to fix has no refcount block");
        };
        let idx = cluster & ((1 << self.rb_bits()) - 1);
        let order = self.order;
        counts::set_entry(self.block(off)?, idx, order, value);
        self.note_written(off);
        Ok(())
    }

    /// A whole block written by the rebuild.
    pub(crate) fn put_block(&mut self, off: u64, data: Vec<u8>) {
        self.file_len = self.file_len.max(off + data.len() as u64);
        self.blocks.insert(off, data);
        self.note_written(off);
    }

    /// Cluster `c` was freed: QEMU discards it.
    fn discard(&mut self, c: u64) {
        let cs = self.cs();
        let off = c << self.cluster_bits;
        if let Some(last) = self.discards.last_mut() {
            if last.0 + last.1 == off {
                last.1 += cs;
                return;
            }
        }
        self.discards.push((off, cs));
    }

    fn note_written(&mut self, off: u64) {
        if !self.order_written.contains(&off) {
            self.order_written.push(off);
        }
    }

    pub(crate) fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), RepairError> {
        self.dev.read_zero_padded(off, buf)?;
        Ok(())
    }
}

/// Plan the repair of the dirty image on `dev` whose header is `h`.
pub fn plan<D: BlockDev + ?Sized>(dev: &mut D, h: &Header) -> Result<RepairPlan, RepairError> {
    refuse_unsupported(h)?;
    let cs = h.cluster_size();
    let file_len = dev.size();
    if file_len.div_ceil(cs) > MAX_CLUSTERS {
        return unsupported("the image is too large to repair within the sandbox's memory");
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits();
    if rt_bytes > crate::geometry::MAX_REFTABLE_BYTES || rt_bytes == 0 {
        return unsupported("refcount table size");
    }
    let mut raw = vec![0u8; rt_bytes as usize];
    dev.read_zero_padded(h.refcount_table_offset, &mut raw)?;
    let rt = instar_blockdev::bytes::be64_table(&raw);
    let mut disk = Disk {
        dev,
        cluster_bits: h.cluster_bits(),
        order: h.refcount_order(),
        rt,
        blocks: BTreeMap::new(),
        order_written: Vec::new(),
        file_len,
        discards: Vec::new(),
    };
    let mut lines = Vec::new();
    let mut header = h.clone();

    let nb = file_len.div_ceil(cs);
    let mut counts = Counts::new(nb, h.refcount_order());
    let mut rebuild_needed = walk::calculate(&mut disk, h, &mut counts, &mut lines)?;
    let before = counts.clone();
    let old_blocks = disk.rt.clone();
    let active = ActiveTables {
        l1: h.l1_table_offset..h.l1_table_offset + u64::from(h.l1_size) * 8,
        l2: walk::l2_tables(&mut disk, h)?
            .into_iter()
            .map(|(o, _)| o)
            .collect(),
    };
    let mismatched = compare(
        &mut disk,
        &counts,
        Fix::None,
        &mut lines,
        &mut rebuild_needed,
    )?;
    let mut new_table = None;
    if rebuild_needed {
        lines.push(Line::Rebuilding);
        let (rt_off, rt_clusters) = rebuild::rebuild(&mut disk, &mut counts)?;
        header.refcount_table_offset = rt_off;
        header.refcount_table_clusters = rt_clusters;
        new_table = Some(rt_off);
        // Recount over the new structure; the old one is now leaked.
        counts.clear();
        let mut broken = walk::calculate(&mut disk, &header, &mut counts, &mut lines)?;
        compare(&mut disk, &counts, Fix::Leaks, &mut lines, &mut broken)?;
        if broken {
            return unsupported("the rebuilt refcount structure would still be broken");
        }
    } else if mismatched {
        let mut again = false;
        compare(&mut disk, &counts, Fix::All, &mut lines, &mut again)?;
    }
    let table_writes = copied::fix(&mut disk, &header, &mut lines)?;

    header.incompatible_features &= !INCOMPAT_DIRTY;
    let discards = core::mem::take(&mut disk.discards);
    let writes = collect_writes(disk, &header, new_table, table_writes)?;
    let old_table = h.refcount_table_offset
        ..h.refcount_table_offset + (u64::from(h.refcount_table_clusters) << h.cluster_bits());
    prove_writes(
        &writes,
        &discards,
        &before,
        &old_blocks,
        old_table,
        &active,
        h.cluster_bits(),
    )?;
    Ok(RepairPlan {
        lines,
        writes,
        discards,
        header,
    })
}

fn refuse_unsupported(h: &Header) -> Result<(), RepairError> {
    if h.version < 3 {
        return unsupported("a version 2 image cannot be dirty");
    }
    if h.nb_snapshots != 0 {
        return unsupported("internal snapshots");
    }
    if h.bitmaps.is_some() || h.has_bitmaps() {
        return unsupported("persistent bitmaps");
    }
    if h.crypt_method != 0 || h.crypto_header.is_some() {
        return unsupported("encryption");
    }
    if h.has_data_file() || h.data_file.is_some() {
        return unsupported("an external data file");
    }
    if h.extended_l2() {
        return unsupported("extended L2 entries");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    Leaks,
    All,
}

/// `compare_refcounts`: one line per mismatched cluster; returns whether any
/// mismatch was found. A mismatch left unfixed (other than in the first, report-only
/// pass) is refused.
fn compare<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    counts: &Counts,
    fix: Fix,
    lines: &mut Vec<Line>,
    rebuild_needed: &mut bool,
) -> Result<bool, RepairError> {
    let mut any = false;
    for i in 0..counts.len() {
        let on_disk = disk.get(i)?;
        let reference = counts.get(i);
        if on_disk == reference {
            continue;
        }
        any = true;
        let fixed = if on_disk == 0 {
            *rebuild_needed = true;
            false
        } else if on_disk > reference {
            fix != Fix::None
        } else {
            fix == Fix::All
        };
        let verdict = if fixed {
            Verdict::Repairing
        } else if on_disk < reference {
            Verdict::Error
        } else {
            Verdict::Leaked
        };
        lines.push(Line::Cluster {
            verdict,
            index: i,
            refcount: on_disk,
            reference,
        });
        if fixed {
            disk.set(i, reference)?;
            if reference == 0 {
                disk.discard(i);
            }
        } else if fix != Fix::None && on_disk != 0 {
            return unsupported("a refcount error QEMU would leave unfixed");
        }
    }
    Ok(any)
}

/// Where the active L1 table and L2 tables are.
struct ActiveTables {
    l1: core::ops::Range<u64>,
    l2: Vec<u64>,
}

/// The audit of the plan, against the references counted before it: the header
/// goes to cluster 0; a refcount block either stays where the image's own table puts
/// it, or goes to a cluster nothing referenced; the new table likewise; a discarded
/// cluster was referenced by nothing, or was part of the old refcount structure.
fn prove_writes(
    writes: &[RepairWrite],
    discards: &[(u64, u64)],
    before: &Counts,
    old_blocks: &[u64],
    old_table: core::ops::Range<u64>,
    tables: &ActiveTables,
    cluster_bits: u32,
) -> Result<(), RepairError> {
    let is_old_block = |off: u64| old_blocks.iter().any(|&e| e & REFT_OFFSET_MASK == off);
    let cs = 1u64 << cluster_bits;
    for w in writes {
        let ok = match w.kind {
            RepairWriteKind::Header => w.offset == 0 && w.data.len() as u64 == cs,
            RepairWriteKind::RefcountBlock | RepairWriteKind::RefcountTable => {
                let first = w.offset >> cluster_bits;
                let n = (w.data.len() as u64).div_ceil(cs);
                (w.kind == RepairWriteKind::RefcountBlock && is_old_block(w.offset))
                    || (first..first + n).all(|c| before.get(c) == 0)
            }
            RepairWriteKind::L1Table => {
                w.offset == tables.l1.start && w.data.len() as u64 == tables.l1.end - w.offset
            }
            RepairWriteKind::L2Table => {
                tables.l2.contains(&w.offset)
                    && w.data.len() as u64 == cs
                    && before.get(w.offset >> cluster_bits) == 1
            }
        };
        if !ok || w.offset % cs != 0 {
            return unsupported("a repair write would land on other metadata or data");
        }
    }
    // No two writes share a byte (the view of the repaired image relies on it).
    let mut spans: Vec<(u64, u64)> = writes
        .iter()
        .map(|w| (w.offset, w.offset + w.data.len() as u64))
        .collect();
    spans.sort_unstable();
    if spans.windows(2).any(|p| p[0].1 > p[1].0) {
        return unsupported("two repair writes would overlap");
    }
    for &(off, len) in discards {
        let first = off >> cluster_bits;
        for c in first..first + len / cs {
            let off = c << cluster_bits;
            let free = is_old_block(off) || old_table.contains(&off) || before.get(c) == 0;
            let rewritten = writes
                .iter()
                .any(|w| off < w.offset + w.data.len() as u64 && w.offset < off + cs);
            if rewritten || !free {
                return unsupported("a repair discard would land on referenced data");
            }
        }
    }
    Ok(())
}

/// The plan's writes: refcount blocks (in first-write order), the new refcount table,
/// then the header cluster.
fn collect_writes<D: BlockDev + ?Sized>(
    mut disk: Disk<'_, D>,
    header: &Header,
    new_table: Option<u64>,
    table_writes: Vec<RepairWrite>,
) -> Result<Vec<RepairWrite>, RepairError> {
    let mut writes = Vec::new();
    let mut total = 0u64;
    for off in core::mem::take(&mut disk.order_written) {
        let Some(data) = disk.blocks.remove(&off) else {
            continue;
        };
        total += data.len() as u64;
        writes.push(RepairWrite {
            offset: off,
            data,
            kind: RepairWriteKind::RefcountBlock,
        });
    }
    if let Some(off) = new_table {
        let mut data = Vec::with_capacity(disk.rt.len() * 8);
        for e in &disk.rt {
            data.extend_from_slice(&e.to_be_bytes());
        }
        total += data.len() as u64;
        writes.push(RepairWrite {
            offset: off,
            data,
            kind: RepairWriteKind::RefcountTable,
        });
    }
    for w in table_writes {
        total += w.data.len() as u64;
        writes.push(w);
    }
    if total > MAX_PATCH_BYTES {
        return unsupported("the repair rewrites too much for the sandbox's memory");
    }
    let cluster = header
        .rebuild()
        .map_err(|_| RepairError::Unsupported("No space left in the file header"))?;
    writes.push(RepairWrite {
        offset: 0,
        data: cluster,
        kind: RepairWriteKind::Header,
    });
    Ok(writes)
}
