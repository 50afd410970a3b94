//! The input of the multi-image targets: a flags byte, then up to [`MAX_IMAGES`] images,
//! each `u32 LE length` + bytes. Decoding never fails (a short length takes what is
//! left), so every byte string is a case: the engines need not know the framing.

use alloc::vec::Vec;

pub const MAX_IMAGES: usize = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    pub flags: u8,
    pub images: Vec<Vec<u8>>,
}

impl Case {
    pub fn decode(data: &[u8]) -> Case {
        let Some((&flags, mut rest)) = data.split_first() else {
            return Case::default();
        };
        let mut images = Vec::new();
        while images.len() < MAX_IMAGES && rest.len() >= 4 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let body = &rest[4..];
            let n = len.min(body.len());
            images.push(body[..n].to_vec());
            rest = &body[n..];
        }
        Case { flags, images }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(1 + self.images.iter().map(|i| 4 + i.len()).sum::<usize>());
        out.push(self.flags);
        for img in self.images.iter().take(MAX_IMAGES) {
            out.extend_from_slice(&(img.len() as u32).to_le_bytes());
            out.extend_from_slice(img);
        }
        out
    }

    pub fn flag(&self, bit: u8) -> bool {
        self.flags & (1 << bit) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let c = Case {
            flags: 5,
            images: vec![vec![1, 2, 3], vec![], vec![9]],
        };
        assert_eq!(Case::decode(&c.encode()), c);
        let short = Case::decode(&[1, 10, 0, 0, 0, 7, 8]);
        assert_eq!(short.images, vec![vec![7, 8]]);
        assert_eq!(Case::decode(&[]), Case::default());
    }
}
