//! Hostile images: random headers and tables over small in-memory files must give
//! errors, never panics, from open, lookups, reads, the repair and the writer.

use instar_blockdev::MemDev;
use instar_qed::header::{Header, MAGIC};
use instar_qed::{QedImage, Writer};
use instar_testkit::Rng;

/// A plausible header (so that most images open) with random damage.
fn image(rng: &mut Rng) -> Vec<u8> {
    let cs = 4096u64 << rng.below(2);
    let ts = 1u32 << (1 + rng.below(2));
    let clusters = 2 + u64::from(ts) + rng.below(24);
    let mut h = Header {
        magic: MAGIC,
        cluster_size: cs as u32,
        table_size: ts,
        header_size: 1,
        features: rng.below(8),
        compat_features: rng.below(2),
        autoclear_features: rng.below(2),
        l1_table_offset: cs,
        image_size: (1 + rng.below(64)) * 512 * 1024,
        backing_filename_offset: 64,
        backing_filename_size: rng.below(80) as u32,
    };
    if rng.below(8) == 0 {
        h.l1_table_offset = rng.next() % (clusters * cs + 1);
    }
    let mut file = vec![0u8; (clusters * cs + rng.below(cs)) as usize];
    file[..64].copy_from_slice(&h.to_bytes());
    // Table entries: zero, the zero marker, cluster offsets in and past the file, junk.
    let entries = file.len() / 8;
    for _ in 0..rng.below(200) {
        let at = 8 * (cs as usize / 8 + rng.below(entries as u64 - cs / 8) as usize);
        let v = match rng.below(6) {
            0 => 0,
            1 => 1,
            2 | 3 => rng.below(clusters + 4) * cs,
            4 => rng.next(),
            _ => rng.below(clusters) * cs + rng.below(cs),
        };
        file[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    file
}

#[test]
fn random_images_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut opened = 0;
    for _ in 0..3000 {
        let file = image(&mut rng);
        let Ok(mut img) = QedImage::open(MemDev::new(file)) else {
            continue;
        };
        opened += 1;
        let size = img.virtual_size();
        let _ = img.repair();
        let mut pos = 0;
        while pos < size {
            match img.find_cluster(pos, size - pos) {
                Ok((_, n)) if n > 0 => pos += n,
                _ => break,
            }
        }
        let mut buf = vec![0u8; 64 << 10];
        let off = rng.below(size.max(1)) / 512 * 512;
        let len = (buf.len() as u64).min(size - off) as usize;
        let _ = img.read(off, &mut buf[..len]);
        let mut w = Writer::new(img, rng.below(2) == 0);
        for _ in 0..4 {
            let off = rng.below(size.max(1)) / 512 * 512;
            let len = (1 + rng.below(300)) * 512;
            let len = len.min(size - off);
            if w.check(off, len).is_err() {
                continue;
            }
            let _ = if rng.below(2) == 0 {
                w.write(off, &vec![7u8; len as usize], None)
            } else {
                w.write_zeroes(off, len, None)
            };
        }
    }
    assert!(opened > 500, "only {opened} images opened");
}
