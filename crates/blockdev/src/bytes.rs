//! Integers and names stored in image bytes, read without panicking: every format
//! crate reads its on-disk fields through these.
//!
//! - [`be32`] and friends read at a run-time offset and answer `None` when the bytes
//!   are not all there, so a short buffer is the caller's decision, never a panic or
//!   a silent zero.
//! - [`Fixed`] reads fields of a fixed-size structure (a header read whole into an
//!   array); its offsets are constants checked against the array length when the
//!   program is compiled.
//! - [`be64_table`] and [`le32_table`] decode whole tables of entries.
//! - [`c_str`] reads a name the way C code holding it as a C string sees it.

use alloc::vec::Vec;

macro_rules! readers {
    ($($name:ident, $fixed:ident: $t:ty, $from:ident;)*) => {
        $(
            #[doc = concat!("The `", stringify!($t), "` at `at` (`", stringify!($from),
                "`), or `None` when `b` ends before it does.")]
            pub fn $name(b: &[u8], at: usize) -> Option<$t> {
                b.get(at..)?
                    .first_chunk::<{ size_of::<$t>() }>()
                    .map(|a| <$t>::$from(*a))
            }
        )*

        impl<const LEN: usize> Fixed<'_, LEN> {
            $(
                #[doc = concat!("The `", stringify!($t), "` at offset `AT` (`",
                    stringify!($from), "`).")]
                pub fn $fixed<const AT: usize>(&self) -> $t {
                    const { assert!(AT + size_of::<$t>() <= LEN, "field outside the structure") };
                    // The assertion above makes the field lie inside the array.
                    $name(self.0, AT).unwrap_or(0)
                }
            )*
        }
    };
}

/// A fixed-size structure read whole: `Fixed(&bytes).be32::<20>()`.
#[derive(Debug, Clone, Copy)]
pub struct Fixed<'a, const LEN: usize>(pub &'a [u8; LEN]);

readers! {
    be16, be16: u16, from_be_bytes;
    be32, be32: u32, from_be_bytes;
    be64, be64: u64, from_be_bytes;
    le16, le16: u16, from_le_bytes;
    le32, le32: u32, from_le_bytes;
    le64, le64: u64, from_le_bytes;
}

/// Everything before the first NUL: QEMU keeps names and descriptors as C strings,
/// so an embedded NUL ends them.
pub fn c_str(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

/// Every whole big-endian `u64` of `raw` (a trailing partial entry is ignored).
pub fn be64_table(raw: &[u8]) -> Vec<u64> {
    raw.as_chunks::<8>()
        .0
        .iter()
        .map(|&c| u64::from_be_bytes(c))
        .collect()
}

/// Every whole little-endian `u32` of `raw` (a trailing partial entry is ignored).
pub fn le32_table(raw: &[u8]) -> Vec<u32> {
    raw.as_chunks::<4>()
        .0
        .iter()
        .map(|&c| u32::from_le_bytes(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_none() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(be32(&b, 0), Some(0x0102_0304));
        assert_eq!(le16(&b, 3), Some(0x0504));
        assert_eq!(be32(&b, 2), None);
        assert_eq!(be64(&b, usize::MAX), None);
        assert_eq!(le64(&b, 0), None);
    }

    #[test]
    fn fixed_fields_and_tables() {
        let b = [0u8, 0, 1, 0, 0, 0, 0, 0, 0, 2];
        let f = Fixed(&b);
        assert_eq!(f.be16::<1>(), 1);
        assert_eq!(f.le16::<2>(), 1);
        assert_eq!(f.be64::<2>(), 0x0100_0000_0000_0002);
        assert_eq!(be64_table(&b), [0x0000_0100_0000_0000]);
        assert_eq!(le32_table(&b), [0x0001_0000, 0]);
    }
}
