//! Frames on one AMST stream, with a size limit on every decode.
//!
//! Sender to receiver: [`Frame::Hello`] once, then [`Frame::Chunk`]s. Receiver to sender:
//! [`Frame::Ack`]s (the first one answers the hello and carries the receiver's resume state).
//!
//! Layout: a 1-byte tag, fixed big-endian fields, then for chunks a 4-byte length and the
//! payload, for acks a 2-byte count and that many 8-byte sequence numbers.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Ack, Chunk};

/// Largest chunk payload a decoder accepts.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// Most selective acknowledgements in one ack frame.
pub const MAX_SACKS: usize = 1024;

const TAG_HELLO: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_ACK: u8 = 3;

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of each stream: which transfer and which stream it belongs to.
    Hello {
        /// Transfer identifier chosen by the sender.
        transfer: [u8; 16],
        /// Stream number within the transfer.
        stream: u32,
    },
    /// A data chunk.
    Chunk(Chunk),
    /// An acknowledgement.
    Ack(Ack),
}

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Unknown frame tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// A chunk larger than [`MAX_CHUNK_BYTES`].
    #[error("chunk of {0} bytes exceeds the limit")]
    ChunkTooLarge(u64),
    /// More sacks than [`MAX_SACKS`].
    #[error("ack with {0} sacks exceeds the limit")]
    TooManySacks(usize),
    /// A flag byte other than 0 or 1.
    #[error("bad flag byte {0}")]
    BadFlag(u8),
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello { transfer, stream } => {
                out.put_u8(TAG_HELLO);
                out.put_slice(transfer);
                out.put_u32(*stream);
            }
            Frame::Chunk(c) => {
                out.put_u8(TAG_CHUNK);
                out.put_u64(c.seq);
                out.put_u64(c.offset);
                out.put_u8(u8::from(c.fin));
                out.put_u32(u32::try_from(c.data.len()).unwrap_or(u32::MAX));
                out.put_slice(&c.data);
            }
            Frame::Ack(a) => {
                out.put_u8(TAG_ACK);
                out.put_u64(a.cumulative);
                out.put_u64(a.window_end);
                let n = a.received.len().min(MAX_SACKS);
                out.put_u16(u16::try_from(n).unwrap_or(u16::MAX));
                for s in &a.received[..n] {
                    out.put_u64(*s);
                }
            }
        }
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed;
    /// on success the frame's bytes are removed from `buf`.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(&tag) = buf.first() else {
            return Ok(None);
        };
        match tag {
            TAG_HELLO => {
                if buf.len() < 1 + 16 + 4 {
                    return Ok(None);
                }
                buf.advance(1);
                let mut transfer = [0u8; 16];
                buf.copy_to_slice(&mut transfer);
                let stream = buf.get_u32();
                Ok(Some(Frame::Hello { transfer, stream }))
            }
            TAG_CHUNK => {
                const HDR: usize = 1 + 8 + 8 + 1 + 4;
                if buf.len() < HDR {
                    return Ok(None);
                }
                let flag = buf[17];
                if flag > 1 {
                    return Err(DecodeError::BadFlag(flag));
                }
                let len = u32::from_be_bytes([buf[18], buf[19], buf[20], buf[21]]) as usize;
                if len > MAX_CHUNK_BYTES {
                    return Err(DecodeError::ChunkTooLarge(len as u64));
                }
                if buf.len() < HDR + len {
                    buf.reserve(HDR + len - buf.len());
                    return Ok(None);
                }
                buf.advance(1);
                let seq = buf.get_u64();
                let offset = buf.get_u64();
                buf.advance(1 + 4);
                let data: Bytes = buf.split_to(len).freeze();
                Ok(Some(Frame::Chunk(Chunk {
                    seq,
                    offset,
                    fin: flag == 1,
                    data,
                })))
            }
            TAG_ACK => {
                const HDR: usize = 1 + 8 + 8 + 2;
                if buf.len() < HDR {
                    return Ok(None);
                }
                let n = usize::from(u16::from_be_bytes([buf[17], buf[18]]));
                if n > MAX_SACKS {
                    return Err(DecodeError::TooManySacks(n));
                }
                if buf.len() < HDR + 8 * n {
                    return Ok(None);
                }
                buf.advance(1);
                let cumulative = buf.get_u64();
                let window_end = buf.get_u64();
                buf.advance(2);
                let received = (0..n).map(|_| buf.get_u64()).collect();
                Ok(Some(Frame::Ack(Ack {
                    cumulative,
                    window_end,
                    received,
                })))
            }
            other => Err(DecodeError::UnknownTag(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        // Byte by byte: never a frame before the last byte.
        let full = b.clone();
        let mut partial = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            partial.put_u8(*byte);
            let r = Frame::decode(&mut partial).unwrap();
            if i + 1 < full.len() {
                assert_eq!(r, None);
            } else {
                assert_eq!(r, Some(f.clone()));
                assert!(partial.is_empty());
            }
        }
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hello {
            transfer: [7; 16],
            stream: 3,
        });
        roundtrip(Frame::Chunk(Chunk {
            seq: 9,
            offset: 1 << 40,
            fin: true,
            data: Bytes::from_static(b"hello"),
        }));
        roundtrip(Frame::Ack(Ack {
            cumulative: 5,
            window_end: 99,
            received: vec![1, 2, 3],
        }));
    }

    #[test]
    fn oversized_and_garbage_input_is_refused() {
        let mut b = BytesMut::from(&[TAG_CHUNK, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        b.extend_from_slice(&[0; 8]);
        b.put_u8(0);
        b.put_u32(u32::MAX);
        assert_eq!(
            Frame::decode(&mut b),
            Err(DecodeError::ChunkTooLarge(u64::from(u32::MAX)))
        );
        let mut g = BytesMut::from(&[0xEEu8, 1, 2][..]);
        assert_eq!(Frame::decode(&mut g), Err(DecodeError::UnknownTag(0xEE)));
        let mut a = BytesMut::new();
        a.put_u8(TAG_ACK);
        a.put_u64(0);
        a.put_u64(0);
        a.put_u16(u16::MAX);
        assert_eq!(
            Frame::decode(&mut a),
            Err(DecodeError::TooManySacks(usize::from(u16::MAX)))
        );
        let mut f = BytesMut::new();
        f.put_u8(TAG_CHUNK);
        f.put_u64(0);
        f.put_u64(0);
        f.put_u8(7);
        f.put_u32(0);
        assert_eq!(Frame::decode(&mut f), Err(DecodeError::BadFlag(7)));
    }
}
