//! The `qed_read` target: open a qed image, walk and read it, plan the open-time
//! repair, list the clusters a write touches and check them for overlaps, and write
//! through [`Writer`] where that check passes. Invariants: planned repair writes stay
//! in the file; a write the overlap check allowed reads back as written.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;

use instar_qed::{QedImage, Writer};

use crate::dev::FuzzDev;
use crate::targets::{signature, walk, MAX_READ};

/// Bytes written by the writer step, at the start and in the middle of the image.
const PATTERN: [u8; 1536] = [0x5a; 1536];

pub fn qed_read(data: &[u8]) -> Result<u64, String> {
    let mut s = match QedImage::open(FuzzDev::new(data.to_vec(), true)) {
        Ok(mut img) => walk(&mut img),
        Err(e) => return Ok(signature(0, &e.to_string())),
    };
    s ^= repair(data)?;
    s ^= write_back(data)?;
    Ok(s)
}

/// Plan the need-check repair: every write lies within the file as it was.
fn repair(data: &[u8]) -> Result<u64, String> {
    let Ok(mut img) = QedImage::open(FuzzDev::new(data.to_vec(), true)) else {
        return Ok(0);
    };
    let r = match img.repair() {
        Ok(r) => r,
        Err(e) => return Ok(signature(10, &e.to_string())),
    };
    for (off, bytes) in &r.writes {
        if off.saturating_add(bytes.len() as u64) > data.len() as u64 {
            return Err(format!(
                "a qed repair write of {} bytes at {off} past the file's end {}",
                bytes.len(),
                data.len()
            ));
        }
    }
    // Lookups after the repair see the repaired tables: they must still work.
    Ok(signature(11, if r.marked_clean { "clean" } else { "dirty" }) ^ walk(&mut img))
}

/// Write through [`Writer`] where the overlap check passes; the data must read back.
fn write_back(data: &[u8]) -> Result<u64, String> {
    let Ok(mut img) = QedImage::open(FuzzDev::new(data.to_vec(), false)) else {
        return Ok(0);
    };
    let size = img.virtual_size();
    if size > MAX_READ || size < PATTERN.len() as u64 {
        return Ok(1);
    }
    let at = [0, (size / 2).min(size - PATTERN.len() as u64)];
    let mut touched = BTreeSet::new();
    for pos in at {
        if let Err(e) = img.touched(pos, PATTERN.len() as u64, &mut touched) {
            return Ok(signature(20, &e.to_string()));
        }
    }
    if let Err(e) = img.check_overlaps(&touched) {
        return Ok(signature(21, &e.to_string()));
    }
    let has_backing = img.header().has_backing();
    let mut w = Writer::new(img, has_backing);
    for pos in at {
        if let Err(e) = w.check(pos, PATTERN.len() as u64) {
            return Ok(signature(22, &e.to_string()));
        }
        if let Err(e) = w.write(pos, &PATTERN, None) {
            return Ok(signature(23, &e.to_string()));
        }
    }
    let dev = w.finish().into_dev();
    if dev.capped {
        return Ok(2);
    }
    let mut img = QedImage::open(FuzzDev::new(dev.data, true))
        .map_err(|e| format!("the qed image written does not open: {e}"))?;
    let mut buf = vec![0u8; PATTERN.len()];
    for pos in at {
        img.read(pos, &mut buf)
            .map_err(|e| format!("the qed image written cannot be read at {pos}: {e}"))?;
        if buf[..] != PATTERN[..] {
            return Err(format!("a qed write at {pos} does not read back"));
        }
    }
    Ok(signature(24, "written"))
}
