//! Reads and allocation status over a backing chain, with QEMU's semantics
//! (`bdrv_co_preadv` through backing files, `bdrv_is_allocated`,
//! `bdrv_is_allocated_above`).
//!
//! Layer 0 is the top; layer `k + 1` is the backing file of layer `k`. A layer
//! shorter than the one above reads as zeros past its end, and for allocation those
//! zeros count as allocated in that short layer (QEMU's `*pnum == 0` case).

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::layer::{Layer, LayerError, LayerState};

/// Where a range's content comes from (`bdrv_is_allocated_above`'s answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Above {
    /// Index of the layer that allocates the start of the range (possibly by ending
    /// before it), or `None` when no layer in the searched span does.
    pub layer: Option<usize>,
    /// Bytes from the offset with that answer; 0 only at or past the top's end.
    pub bytes: u64,
}

/// A backing chain, top first.
pub struct ChainView<'a> {
    layers: Vec<Box<dyn Layer + 'a>>,
}

impl<'a> ChainView<'a> {
    pub fn new(layers: Vec<Box<dyn Layer + 'a>>) -> Self {
        ChainView { layers }
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// Size of the top layer (0 for an empty chain).
    pub fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.virtual_size())
    }
    pub fn layer_mut(&mut self, k: usize) -> Option<&mut (dyn Layer + 'a)> {
        self.layers.get_mut(k).map(|b| &mut **b)
    }

    /// `bdrv_co_do_block_status` on layer `k` in allocation mode: `(state, bytes)`,
    /// with `bytes == 0` at or past the layer's end.
    fn status(
        &mut self,
        k: usize,
        offset: u64,
        bytes: u64,
    ) -> Result<(LayerState, u64), LayerError> {
        let layer = self.layers.get_mut(k).ok_or(LayerError::NoSuchLayer(k))?;
        let size = layer.virtual_size();
        if offset >= size || bytes == 0 {
            return Ok((LayerState::Unallocated, 0));
        }
        let bytes = bytes.min(size - offset);
        let (state, n) = layer.block_status(offset, bytes)?;
        if n == 0 || n > bytes {
            return Err(LayerError::BadRun { layer: k, offset });
        }
        Ok((state, n))
    }

    /// `bdrv_is_allocated(layer k)`: whether the start of the range is allocated in
    /// layer `k` itself, and the run length (0 at or past its end).
    pub fn is_allocated(
        &mut self,
        k: usize,
        offset: u64,
        bytes: u64,
    ) -> Result<(bool, u64), LayerError> {
        let (state, n) = self.status(k, offset, bytes)?;
        Ok((n > 0 && state.is_allocated(), n))
    }

    /// `bdrv_is_allocated_above(layer top, layer base, include_base = false)`: whether
    /// any layer in `top..base` allocates the start of the range. `base = None` (or
    /// past the chain) searches to the bottom of the chain.
    pub fn is_allocated_above(
        &mut self,
        top: usize,
        base: Option<usize>,
        offset: u64,
        bytes: u64,
    ) -> Result<Above, LayerError> {
        let end = base.unwrap_or(self.layers.len()).min(self.layers.len());
        if top >= end {
            return Ok(Above { layer: None, bytes });
        }
        let (state, mut n) = self.status(top, offset, bytes)?;
        if n == 0 || state.is_allocated() {
            return Ok(Above {
                layer: (n > 0).then_some(top),
                bytes: n,
            });
        }
        let mut bytes = n;
        for p in top + 1..end {
            let (state, pn) = self.status(p, offset, bytes)?;
            if pn == 0 {
                // Layer p ends before the range: its synthesized zeros are allocated
                // there.
                return Ok(Above {
                    layer: Some(p),
                    bytes,
                });
            }
            if state.is_allocated() {
                return Ok(Above {
                    layer: Some(p),
                    bytes: pn,
                });
            }
            bytes = pn;
            n = pn;
        }
        Ok(Above {
            layer: None,
            bytes: n,
        })
    }

    /// Read the chain's content as seen from layer `k` (the whole chain for `k = 0`):
    /// each byte from the highest layer at or below `k` that allocates it, zeros past
    /// a layer's end or below the bottom. The range must lie inside layer `k`.
    pub fn read_from(&mut self, k: usize, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        let len = buf.len() as u64;
        let size = self
            .layers
            .get(k)
            .ok_or(LayerError::NoSuchLayer(k))?
            .virtual_size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(LayerError::BeyondVirtualSize { offset, len });
        }
        // Iterate down the chain with an explicit stack of pending ranges, so a deep
        // chain costs no recursion.
        let mut todo: Vec<(usize, u64, usize, usize)> = Vec::new();
        todo.push((k, offset, 0, buf.len()));
        while let Some((layer, off, start, end)) = todo.pop() {
            if layer >= self.layers.len() {
                buf[start..end].fill(0);
                continue;
            }
            let lsize = self.layers[layer].virtual_size();
            let mut pos = start;
            while pos < end {
                let o = off + (pos - start) as u64;
                if o >= lsize {
                    buf[pos..end].fill(0);
                    break;
                }
                let want = (end - pos) as u64;
                let (state, n) = self.status(layer, o, want)?;
                let n = n as usize;
                match state {
                    LayerState::Data => self.layers[layer].read(o, &mut buf[pos..pos + n])?,
                    LayerState::Zero => buf[pos..pos + n].fill(0),
                    LayerState::Unallocated => todo.push((layer + 1, o, pos, pos + n)),
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// Read the top's view of the disk.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        self.read_from(0, offset, buf)
    }
}
