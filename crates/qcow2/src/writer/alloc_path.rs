//! The data write path: building host-contiguous chunks (`qcow2_alloc_host_offset`,
//! `handle_copied`, `handle_alloc`, `calculate_l2_meta`), writing them with their
//! copy-on-write padding, and linking the new clusters into L2 (`link_l2`).

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::cache::Which;
use super::table::{
    sub_alloc_range, sub_zero_range, ClusterType, ScType, SliceRef, BITMAP_ALL_ALLOC,
};
use super::{corrupt, Below, WriteError, WriteKind, Writer, REQUEST_MAX_BYTES};
use crate::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED};

/// `QCOW_MAX_CRYPT_CLUSTERS`: the most clusters one encrypted write step covers.
const MAX_CRYPT_CLUSTERS: u64 = 32;

/// One allocation (or in-place overwrite) of a chunk and its copy-on-write regions
/// (QEMU's `QCowL2Meta`). Region offsets are relative to `guest`.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Host offset of the first cluster.
    alloc: u64,
    /// Guest offset of the first cluster.
    guest: u64,
    nb_clusters: u64,
    keep_old: bool,
    cow_start: (u64, u64),
    cow_end: (u64, u64),
    skip_cow: bool,
}

impl Meta {
    fn has_cow(&self) -> bool {
        self.cow_start.1 != 0 || self.cow_end.1 != 0
    }
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    fn needs_new_alloc(&self, e: u64) -> bool {
        match self.cluster_type(e) {
            ClusterType::Normal | ClusterType::ZeroAlloc => e & OFLAG_COPIED == 0,
            _ => true,
        }
    }

    fn sc_of(&self, off: u64) -> u32 {
        if self.geometry.extended_l2() {
            ((off >> self.geometry.subcluster_bits()) & 31) as u32
        } else {
            0
        }
    }

    /// One driver-level write request (`qcow2_co_pwritev_part`).
    pub(crate) fn pwritev(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        if self.encrypted && self.crypt.is_none() && !self.dry_run {
            return Err(WriteError::Unsupported("encrypted image without its key"));
        }
        let mut off = offset;
        let mut done = 0usize;
        while done < data.len() {
            let mut want = (data.len() - done) as u64;
            if self.encrypted {
                // QEMU encrypts at most QCOW_MAX_CRYPT_CLUSTERS clusters per step.
                let cs = self.geometry.cluster_size();
                want = want.min(MAX_CRYPT_CLUSTERS * cs - self.offset_into_cluster(off));
            }
            let (host, n, metas) = self.alloc_host_offset(off, want)?;
            let n = n as usize;
            let chunk = &data[done..done + n];
            match self.crypt.clone() {
                Some(c) => {
                    let mut sealed = chunk.to_vec();
                    c.encrypt(host, off, &mut sealed);
                    self.write_chunk(host, off, &sealed, metas)?;
                }
                None => self.write_chunk(host, off, chunk, metas)?,
            }
            off += n as u64;
            done += n;
        }
        Ok(())
    }

    /// `qcow2_alloc_host_offset`: the longest host-contiguous chunk from `offset`.
    fn alloc_host_offset(
        &mut self,
        offset: u64,
        bytes: u64,
    ) -> Result<(u64, u64, Vec<Meta>), WriteError> {
        let mut start = offset;
        let mut remaining = bytes;
        let mut cluster_offset: Option<u64> = None;
        let mut host: Option<u64> = None;
        let mut metas = Vec::new();
        while remaining > 0 {
            let mut cur = remaining;
            let progressed =
                if self.handle_copied(start, &mut cluster_offset, &mut cur, &mut metas)? {
                    true
                } else if cur == 0 {
                    false
                } else {
                    self.handle_alloc(start, &mut cluster_offset, &mut cur, &mut metas)?
                };
            if !progressed {
                break;
            }
            if host.is_none() {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            cluster_offset = cluster_offset.map(|c| c + cur);
        }
        let host = host.ok_or(corrupt("no progress allocating a write", offset))?;
        Ok((host, bytes - remaining, metas))
    }

    fn step_clusters(&self, guest: u64, bytes: u64, s: SliceRef) -> u64 {
        let nb = self.size_to_clusters(self.offset_into_cluster(guest) + bytes);
        nb.min(self.geometry.l2_slice_entries() - s.index)
            .min(REQUEST_MAX_BYTES >> self.geometry.cluster_bits())
    }

    /// Entries from `s` that can be written by one request: all needing a new
    /// allocation, or all COPIED and host-contiguous.
    fn count_single_write(
        &mut self,
        nb: u64,
        s: SliceRef,
        new_alloc: bool,
    ) -> Result<u64, WriteError> {
        let (first, _) = self.l2_get(s, 0)?;
        let mut expected = first & L2E_OFFSET_MASK;
        for i in 0..nb {
            let (e, _) = self.l2_get(s, i)?;
            if self.needs_new_alloc(e) != new_alloc {
                return Ok(i);
            }
            if !new_alloc {
                if expected != e & L2E_OFFSET_MASK {
                    return Ok(i);
                }
                expected += self.geometry.cluster_size();
            }
        }
        Ok(nb)
    }

    fn handle_copied(
        &mut self,
        guest: u64,
        host: &mut Option<u64>,
        bytes: &mut u64,
        metas: &mut Vec<Meta>,
    ) -> Result<bool, WriteError> {
        let s = self.get_cluster_table(guest)?;
        let nb = self.step_clusters(guest, *bytes, s);
        let (e, _) = self.l2_get(s, 0)?;
        let coff = e & L2E_OFFSET_MASK;
        if self.needs_new_alloc(e) {
            return Ok(false);
        }
        if self.offset_into_cluster(coff) != 0 {
            return Err(corrupt("data cluster offset unaligned", coff));
        }
        if let Some(h) = *host {
            if h != coff {
                *bytes = 0;
                return Ok(false);
            }
        }
        let keep = self.count_single_write(nb, s, false)?;
        *bytes =
            (*bytes).min(keep * self.geometry.cluster_size() - self.offset_into_cluster(guest));
        self.calculate_l2_meta(coff, guest, *bytes, s, metas, true)?;
        *host = Some(coff + self.offset_into_cluster(guest));
        Ok(true)
    }

    fn handle_alloc(
        &mut self,
        guest: u64,
        host: &mut Option<u64>,
        bytes: &mut u64,
        metas: &mut Vec<Meta>,
    ) -> Result<bool, WriteError> {
        let s = self.get_cluster_table(guest)?;
        let nb = self.step_clusters(guest, *bytes, s);
        let mut nb = self.count_single_write(nb, s, true)?;
        if nb == 0 {
            return Err(corrupt("nothing to allocate", guest));
        }
        let alloc = match *host {
            None => self.alloc_clusters(nb)? << self.geometry.cluster_bits(),
            Some(h) => {
                let at = h >> self.geometry.cluster_bits();
                nb = self.alloc_clusters_at(at, nb)?;
                at << self.geometry.cluster_bits()
            }
        };
        if nb == 0 {
            *bytes = 0;
            return Ok(false);
        }
        let oic = self.offset_into_cluster(guest);
        let requested = *bytes + oic;
        let avail = nb << self.geometry.cluster_bits();
        let nb_bytes = requested.min(avail);
        *host = Some(alloc + oic);
        *bytes = (*bytes).min(nb_bytes - oic);
        // The slice may have been dropped and reloaded by refcount work; re-resolve.
        let s = self.get_cluster_table(guest)?;
        self.calculate_l2_meta(alloc, guest, *bytes, s, metas, false)?;
        Ok(true)
    }

    fn calculate_l2_meta(
        &mut self,
        host_cluster: u64,
        guest: u64,
        bytes: u64,
        s: SliceRef,
        metas: &mut Vec<Meta>,
        keep_old: bool,
    ) -> Result<(), WriteError> {
        let cs = self.geometry.cluster_size();
        let sc_size = 1u64 << self.geometry.subcluster_bits();
        let cow_start_to = self.offset_into_cluster(guest);
        let cow_end_from = cow_start_to + bytes;
        let nb = self.size_to_clusters(cow_end_from);
        let mut skip_cow = keep_old;
        for i in 0..nb {
            let (e, b) = self.l2_get(s, i)?;
            if skip_cow {
                let write_from = cow_start_to.max(i << self.geometry.cluster_bits());
                let write_to = cow_end_from.min((i + 1) << self.geometry.cluster_bits());
                let first_sc = self.sc_of(write_from);
                let last_sc = self.sc_of(write_to - 1);
                let (t, cnt) = self
                    .sc_range_type(e, b, first_sc)
                    .ok_or(corrupt("invalid L2 entry", e))?;
                if t != ScType::Normal || first_sc + cnt <= last_sc {
                    skip_cow = false;
                }
            } else if self.sc_type(e, b, 0).is_none() {
                return Err(corrupt("invalid L2 entry", e));
            }
        }
        if skip_cow {
            return Ok(());
        }

        let (e, b) = self.l2_get(s, 0)?;
        let sc = self.sc_of(guest);
        let t = self
            .sc_type(e, b, sc)
            .ok_or(corrupt("invalid L2 entry", e))?;
        let sc_start = (sc as u64) << self.geometry.subcluster_bits();
        let cow_start_from = match (keep_old, t) {
            (false, ScType::Compressed) => 0,
            (false, ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc) => {
                if self.geometry.extended_l2() {
                    let first_alloc = ((b & BITMAP_ALL_ALLOC) as u32).trailing_zeros();
                    (sc.min(first_alloc) as u64) << self.geometry.subcluster_bits()
                } else {
                    0
                }
            }
            (false, ScType::ZeroPlain | ScType::UnallocatedPlain) => sc_start,
            (true, ScType::Normal) => cow_start_to,
            (true, ScType::ZeroAlloc | ScType::UnallocatedAlloc) => sc_start,
            (true, _) => return Err(corrupt("in-place write into an unallocated cluster", e)),
        };

        let (e, b) = self.l2_get(s, nb - 1)?;
        let sc = self.sc_of(guest + bytes - 1);
        let t = self
            .sc_type(e, b, sc)
            .ok_or(corrupt("invalid L2 entry", e))?;
        let cow_end_to = match (keep_old, t) {
            (false, ScType::Compressed) => cow_end_from.div_ceil(cs) * cs,
            (false, ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc) => {
                let mut to = cow_end_from.div_ceil(cs) * cs;
                if self.geometry.extended_l2() {
                    let trailing = ((b & BITMAP_ALL_ALLOC) as u32).leading_zeros();
                    to -= ((31 - sc).min(trailing) as u64) << self.geometry.subcluster_bits();
                }
                to
            }
            (false, ScType::ZeroPlain | ScType::UnallocatedPlain) => {
                cow_end_from.div_ceil(sc_size) * sc_size
            }
            (true, ScType::Normal) => cow_end_from,
            (true, ScType::ZeroAlloc | ScType::UnallocatedAlloc) => {
                cow_end_from.div_ceil(sc_size) * sc_size
            }
            (true, _) => return Err(corrupt("in-place write into an unallocated cluster", e)),
        };

        metas.push(Meta {
            alloc: host_cluster,
            guest: guest & !(cs - 1),
            nb_clusters: nb,
            keep_old,
            cow_start: (cow_start_from, cow_start_to - cow_start_from),
            cow_end: (cow_end_from, cow_end_to - cow_end_from),
            skip_cow: false,
        });
        Ok(())
    }

    /// `qcow2_co_pwritev_task`: zero-fill padding that reads as zero, write the data
    /// (merged with its padding when it lines up), then link every allocation.
    fn write_chunk(
        &mut self,
        host: u64,
        guest: u64,
        data: &[u8],
        mut metas: Vec<Meta>,
    ) -> Result<(), WriteError> {
        // QEMU keeps the list newest first.
        metas.reverse();
        for m in metas.iter_mut() {
            if !m.has_cow() {
                continue;
            }
            // QEMU never zero-fills an encrypted image's padding (zeros on disk would
            // not read back as zeros): it encrypts the padding's content instead.
            if !self.encrypted && self.cow_reads_zero(m)? {
                let start = m.alloc + m.cow_start.0;
                let len = m.cow_end.0 + m.cow_end.1 - m.cow_start.0;
                self.dev_zero_range(start, len)?;
                m.skip_cow = true;
            }
        }
        let end = guest + data.len() as u64;
        let merged = metas.iter().position(|m| {
            m.has_cow()
                && !m.skip_cow
                && m.guest + m.cow_start.0 + m.cow_start.1 == guest
                && m.guest + m.cow_end.0 == end
        });
        if merged.is_none() {
            self.dev_write(host, data, WriteKind::Data)?;
        }
        // The L2 entries must not reach the disk before the data.
        self.l2_cache.depends_on_flush = true;
        for (i, m) in metas.iter().enumerate() {
            let d = if merged == Some(i) { Some(data) } else { None };
            self.link_l2(m, d)?;
        }
        Ok(())
    }

    /// Whether both padding regions of `m` read as zero (`bdrv_co_is_zero_fast`): zero
    /// subclusters, or unallocated ones without a backing file. Past the end of the disk
    /// QEMU reports "not zero".
    fn cow_reads_zero(&mut self, m: &Meta) -> Result<bool, WriteError> {
        for (off, n) in [m.cow_start, m.cow_end] {
            if n == 0 {
                continue;
            }
            let g = m.guest + off;
            if g + n > self.geometry.virtual_size() {
                return Ok(false);
            }
            let sc_size = 1u64 << self.geometry.subcluster_bits();
            let mut p = g & !(sc_size - 1);
            while p < g + n {
                let (e, b) = self.lookup(p)?;
                let zero = match self.sc_type(e, b, self.sc_of(p)) {
                    Some(ScType::ZeroPlain | ScType::ZeroAlloc) => true,
                    Some(ScType::UnallocatedPlain | ScType::UnallocatedAlloc) => !self.has_backing,
                    _ => false,
                };
                if !zero {
                    return Ok(false);
                }
                p += sc_size;
            }
        }
        Ok(true)
    }

    /// The current L2 entry and bitmap of guest offset `g`, without allocating.
    fn lookup(&mut self, g: u64) -> Result<(u64, u64), WriteError> {
        let l1_index =
            g >> (self.geometry.cluster_bits() + self.geometry.l2_entries().trailing_zeros());
        let Some(&l1e) = self.l1.get(l1_index as usize) else {
            return Ok((0, 0));
        };
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            return Ok((0, 0));
        }
        if self.offset_into_cluster(l2_off) != 0 {
            return Err(corrupt("L2 table offset unaligned", l2_off));
        }
        let es = crate::entry::l2_entry_size(self.geometry.extended_l2());
        let si = self.slice_index(g);
        let slice_off = l2_off + es * (self.l2_index(g) - si);
        self.cache_get(Which::L2, slice_off)?;
        self.l2_get(
            SliceRef {
                offset: slice_off,
                index: si,
            },
            0,
        )
    }

    /// Guest content at `g` as the image reads it now (the source of copy-on-write).
    fn read_guest(&mut self, g: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        let sc_size = 1u64 << self.geometry.subcluster_bits();
        let mut done = 0usize;
        while done < buf.len() {
            let p = g + done as u64;
            let n = ((sc_size - (p & (sc_size - 1))) as usize).min(buf.len() - done);
            let (e, b) = self.lookup(p)?;
            let part = &mut buf[done..done + n];
            match self
                .sc_type(e, b, self.sc_of(p))
                .ok_or(corrupt("invalid L2 entry", e))?
            {
                ScType::Normal => {
                    let host = (e & L2E_OFFSET_MASK) + self.offset_into_cluster(p);
                    self.dev.read_at(host, part)?;
                    if let Some(c) = &self.crypt {
                        c.decrypt(host, p, part);
                    }
                }
                ScType::ZeroPlain | ScType::ZeroAlloc => part.fill(0),
                ScType::UnallocatedPlain | ScType::UnallocatedAlloc => {
                    if self.has_backing {
                        self.backing.read_below(p, part)?;
                    } else {
                        part.fill(0);
                    }
                }
                ScType::Compressed => {
                    return Err(WriteError::Unsupported(
                        "copy-on-write of a compressed cluster",
                    ))
                }
            }
            done += n;
        }
        Ok(())
    }

    /// `qcow2_alloc_cluster_link_l2` (with `perform_cow`).
    fn link_l2(&mut self, m: &Meta, merged_data: Option<&[u8]>) -> Result<(), WriteError> {
        if m.has_cow() && !m.skip_cow {
            let mut start = vec![0u8; m.cow_start.1 as usize];
            let mut end = vec![0u8; m.cow_end.1 as usize];
            self.read_guest(m.guest + m.cow_start.0, &mut start)?;
            self.read_guest(m.guest + m.cow_end.0, &mut end)?;
            if let Some(c) = &self.crypt {
                c.encrypt(m.alloc + m.cow_start.0, m.guest + m.cow_start.0, &mut start);
                c.encrypt(m.alloc + m.cow_end.0, m.guest + m.cow_end.0, &mut end);
            }
            if let Some(d) = merged_data {
                let mut all = start;
                all.extend_from_slice(d);
                all.extend_from_slice(&end);
                self.dev_write(m.alloc + m.cow_start.0, &all, WriteKind::Data)?;
            } else {
                self.dev_write(m.alloc + m.cow_start.0, &start, WriteKind::Data)?;
                self.dev_write(m.alloc + m.cow_end.0, &end, WriteKind::Data)?;
            }
            self.l2_cache.depends_on_flush = true;
        }

        if self.lazy_refcounts {
            self.mark_dirty()?;
        }
        if self.need_accurate_refcounts() {
            self.cache_set_dependency(Which::L2)?;
        }

        let s = self.get_cluster_table(m.guest)?;
        self.l2_mark_dirty(s)?;
        let mut old = Vec::new();
        let written_to_all = m.cow_end.0 + m.cow_end.1;
        for i in 0..m.nb_clusters {
            let (e, b) = self.l2_get(s, i)?;
            if e != 0 {
                old.push(e);
            }
            let new_e = (m.alloc + (i << self.geometry.cluster_bits())) | OFLAG_COPIED;
            let bitmap = if self.geometry.extended_l2() {
                let from = m.cow_start.0.max(i << self.geometry.cluster_bits());
                let to = written_to_all.min((i + 1) << self.geometry.cluster_bits());
                if from >= to {
                    return Err(corrupt("empty subcluster range in a write", m.guest));
                }
                let first = self.sc_of(from);
                let last = self.sc_of(to - 1);
                Some((b | sub_alloc_range(first, last + 1)) & !sub_zero_range(first, last + 1))
            } else {
                None
            };
            self.l2_set(s, i, new_e, bitmap)?;
        }
        if !m.keep_old {
            for e in old {
                self.free_any_cluster(e)?;
            }
        }
        Ok(())
    }
}
