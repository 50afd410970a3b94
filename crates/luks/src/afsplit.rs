//! The anti-forensic merge (LUKS1 "AF-merge"): the master key is the last stripe XORed
//! with the diffusion of all the stripes before it.

use alloc::vec;
use zeroize::Zeroizing;

use crate::HashAlg;

/// Diffuse `block` in place: each digest-sized chunk i becomes H(be32(i) || chunk),
/// truncated to the chunk's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dlen = hash.digest_len();
    for (i, chunk) in block.chunks_mut(dlen).enumerate() {
        let iv = (i as u32).to_be_bytes();
        let out = Zeroizing::new(hash.digest(&[&iv, chunk]));
        let n = chunk.len();
        chunk.copy_from_slice(&out[..n]);
    }
}

/// Merge `stripes` stripes of `key_len` bytes (`split`, at least `stripes * key_len`
/// bytes) into `out` (`key_len` bytes).
pub fn merge(hash: HashAlg, split: &[u8], stripes: usize, out: &mut [u8]) {
    let key_len = out.len();
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for i in 0..stripes.saturating_sub(1) {
        let stripe = &split[i * key_len..(i + 1) * key_len];
        acc.iter_mut().zip(stripe).for_each(|(a, s)| *a ^= s);
        diffuse(hash, &mut acc);
    }
    let last = stripes.saturating_sub(1) * key_len;
    let stripe = &split[last..last + key_len];
    out.iter_mut()
        .zip(acc.iter().zip(stripe))
        .for_each(|(o, (a, s))| *o = a ^ s);
}
