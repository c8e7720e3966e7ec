//! Bounds-checked little-endian and LEB128 reading and writing shared by the frame and
//! message codecs. Every read checks the remaining length first, so malformed input
//! becomes a [`DecodeError`] and never a panic.

use crate::error::DecodeError;
use crate::page::{HASH_LEN, PageHash};

/// Appends `v` as an unsigned LEB128 varint (at most 10 bytes).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over a byte slice whose reads fail cleanly at the end of input.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { what });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub(crate) fn u64_le(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn hash(&mut self, what: &'static str) -> Result<PageHash, DecodeError> {
        let b = self.bytes(HASH_LEN, what)?;
        let mut a = [0u8; HASH_LEN];
        a.copy_from_slice(b);
        Ok(PageHash(a))
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10u32 {
            let b = self.u8(what)?;
            let low = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(DecodeError::VarintOverflow { what });
            }
            v |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::VarintOverflow { what })
    }

    /// A varint that must fit `limit` (inclusive), converted to `usize`.
    pub(crate) fn varint_max(
        &mut self,
        what: &'static str,
        limit: u64,
    ) -> Result<usize, DecodeError> {
        let v = self.varint(what)?;
        if v > limit {
            return Err(DecodeError::TooLarge {
                what,
                len: v,
                limit,
            });
        }
        usize::try_from(v).map_err(|_| DecodeError::TooLarge {
            what,
            len: v,
            limit,
        })
    }

    pub(crate) fn expect_end(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                what,
                extra: self.remaining(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trip(v in any::<u64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            prop_assert!(out.len() <= 10);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.varint("v").unwrap(), v);
            prop_assert_eq!(r.remaining(), 0);
        }
    }

    #[test]
    fn varint_rejects_overlong_and_truncated() {
        let too_long = [0xffu8; 11];
        assert!(matches!(
            Reader::new(&too_long).varint("v"),
            Err(DecodeError::VarintOverflow { .. })
        ));
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(matches!(
            Reader::new(&overflow).varint("v"),
            Err(DecodeError::VarintOverflow { .. })
        ));
        assert!(matches!(
            Reader::new(&[0x80]).varint("v"),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
