//! Write-back caches for L2 slices and refcount blocks, with QEMU's dependency rules
//! (`qcow2-cache.c`): a cache may depend on the other one (whose dirty tables must reach
//! the device, flushed, before any of its own are written) or on a device flush.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::{corrupt, Below, WriteError, WriteKind, Writer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    L2,
    Refcount,
}

impl Which {
    fn other(self) -> Which {
        match self {
            Which::L2 => Which::Refcount,
            Which::Refcount => Which::L2,
        }
    }
}

pub(crate) struct Table {
    pub data: Vec<u8>,
    pub dirty: bool,
}

pub(crate) struct TableCache {
    pub table_size: usize,
    pub tables: BTreeMap<u64, Table>,
    /// Dirty tables of the other cache must be written and flushed first.
    pub depends: bool,
    /// The device must be flushed before the next table of this cache is written.
    pub depends_on_flush: bool,
}

impl TableCache {
    pub fn new(table_size: usize) -> Self {
        TableCache {
            table_size,
            tables: BTreeMap::new(),
            depends: false,
            depends_on_flush: false,
        }
    }
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    pub(crate) fn cache(&mut self, w: Which) -> &mut TableCache {
        match w {
            Which::L2 => &mut self.l2_cache,
            Which::Refcount => &mut self.rb_cache,
        }
    }

    /// Make the table at `offset` resident, reading it from the device if needed.
    pub(crate) fn cache_get(&mut self, w: Which, offset: u64) -> Result<(), WriteError> {
        if self.cache(w).tables.contains_key(&offset) {
            return Ok(());
        }
        if offset == 0 || !offset.is_multiple_of(self.cache(w).table_size as u64) {
            return Err(corrupt("metadata table offset", offset));
        }
        let size = self.cache(w).table_size;
        let mut data = vec![0u8; size];
        self.dev.read_at(offset, &mut data)?;
        self.cache(w)
            .tables
            .insert(offset, Table { data, dirty: false });
        Ok(())
    }

    /// A zeroed, dirty table at `offset` (`qcow2_cache_get_empty` + memset + mark dirty).
    pub(crate) fn cache_get_empty(&mut self, w: Which, offset: u64) {
        let size = self.cache(w).table_size;
        self.cache(w).tables.insert(
            offset,
            Table {
                data: vec![0u8; size],
                dirty: true,
            },
        );
    }

    pub(crate) fn table(&mut self, w: Which, offset: u64) -> Result<&mut Table, WriteError> {
        self.cache(w)
            .tables
            .get_mut(&offset)
            .ok_or(corrupt("table not resident", offset))
    }

    /// Drop a table without writing it (its cluster was freed).
    pub(crate) fn cache_discard(&mut self, w: Which, offset: u64) {
        self.cache(w).tables.remove(&offset);
    }

    fn cache_entry_flush(&mut self, w: Which, offset: u64) -> Result<(), WriteError> {
        if self.cache(w).depends {
            self.cache_flush_dependency(w)?;
        } else if self.cache(w).depends_on_flush {
            self.dev_flush()?;
            self.cache(w).depends_on_flush = false;
        }
        let data = match self.cache(w).tables.get(&offset) {
            Some(t) if t.dirty => t.data.clone(),
            _ => return Ok(()),
        };
        let kind = match w {
            Which::L2 => WriteKind::L2Table,
            Which::Refcount => WriteKind::RefcountBlock,
        };
        self.dev_write(offset, &data, kind)?;
        if let Some(t) = self.cache(w).tables.get_mut(&offset) {
            t.dirty = false;
        }
        Ok(())
    }

    /// `qcow2_cache_write`: every dirty table, honouring dependencies.
    pub(crate) fn cache_write(&mut self, w: Which) -> Result<(), WriteError> {
        let dirty: Vec<u64> = self
            .cache(w)
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        for off in dirty {
            self.cache_entry_flush(w, off)?;
        }
        Ok(())
    }

    /// `qcow2_cache_flush`: write, then flush the device.
    pub(crate) fn cache_flush(&mut self, w: Which) -> Result<(), WriteError> {
        self.cache_write(w)?;
        self.dev_flush()
    }

    fn cache_flush_dependency(&mut self, w: Which) -> Result<(), WriteError> {
        self.cache_flush(w.other())?;
        let c = self.cache(w);
        c.depends = false;
        c.depends_on_flush = false;
        Ok(())
    }

    /// `qcow2_cache_set_dependency(c = w, dependency = other)`.
    pub(crate) fn cache_set_dependency(&mut self, w: Which) -> Result<(), WriteError> {
        let dep = w.other();
        if self.cache(dep).depends {
            self.cache_flush_dependency(dep)?;
        }
        self.cache(w).depends = true;
        Ok(())
    }
}
