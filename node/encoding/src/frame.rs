//! The versioned HDE frame: the envelope around every message that crosses the wire.
//!
//! ```text
//!  0        4     5      6          8                12               16
//!  +--------+-----+------+----------+----------------+----------------+--------------
//!  | magic  | ver | kind | flags    | payload length | CRC-32         | payload ...
//!  | "DWHE" | =2  | u8   | u16 LE=0 | u32 LE         | u32 LE         | (length bytes)
//!  +--------+-----+------+----------+----------------+----------------+--------------
//! ```
//!
//! * `magic` is the ASCII bytes `DWHE`; anything else is [`DecodeError::BadMagic`].
//! * `ver` is the format version, [`VERSION`]; a decoder rejects versions it does not know.
//! * `kind` is a [`FrameKind`]; unknown kinds are rejected.
//! * `flags` are reserved and must be zero, so a later version can use them.
//! * `payload length` is checked against the decoder's limit *before* anything is
//!   allocated or read.
//! * `CRC-32` (IEEE, as in zlib/Ethernet, SIMD via `crc32fast`) covers header bytes 0..12
//!   and the whole payload. It catches corruption and truncation; authenticity is the
//!   transport's job (the AMST streams run inside noise/QUIC).
//!
//! The payload of each kind is described in [`crate::message`].

use crate::error::DecodeError;

/// The four magic bytes at the start of every frame.
pub const MAGIC: [u8; 4] = *b"DWHE";
/// The frame format version this crate writes and reads.
///
/// * 1: the first format.
/// * 2: `Start` carries a VM id, offers carry page keys, `Missing` replies name delta
///   bases, batch ops are `kind | operand << 3` with kind 4 = XOR delta page (see
///   [`crate::message`]). Version 1 frames are rejected.
pub const VERSION: u8 = 2;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 16;

/// What a frame carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum FrameKind {
    /// Sender to receiver: a transfer begins (its shape and id).
    Start = 1,
    /// Sender to receiver: a trained zstd dictionary, sent once and named by id.
    Dict = 2,
    /// Sender to receiver: hashes of a batch's candidate pages.
    Offer = 3,
    /// Receiver to sender: which offered pages the receiver does not hold.
    Missing = 4,
    /// Sender to receiver: a batch of pages (or stream bytes), compressed.
    Batch = 5,
    /// Sender to receiver: the transfer is complete.
    End = 6,
}

impl FrameKind {
    fn from_u8(b: u8) -> Result<Self, DecodeError> {
        Ok(match b {
            1 => Self::Start,
            2 => Self::Dict,
            3 => Self::Offer,
            4 => Self::Missing,
            5 => Self::Batch,
            6 => Self::End,
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

/// A decoded frame borrowing its payload from the input buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameRef<'a> {
    /// The frame kind.
    pub kind: FrameKind,
    /// The payload bytes (already checksum-verified).
    pub payload: &'a [u8],
}

/// Writes one frame (header and payload) to `out`.
///
/// Payloads are bounded by the encoder's batch limits, far below `u32::MAX`; a larger
/// payload is a bug in this crate, reported as [`DecodeError::TooLarge`].
pub fn write_frame(out: &mut Vec<u8>, kind: FrameKind, payload: &[u8]) -> Result<(), DecodeError> {
    let len = u32::try_from(payload.len()).map_err(|_| DecodeError::TooLarge {
        what: "frame payload",
        len: payload.len() as u64,
        limit: u64::from(u32::MAX),
    })?;
    let start = out.len();
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 12]);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Starts a frame in `out`: reserves the header; write the payload after it, then call
/// [`finish_frame`] with the returned start offset. Avoids copying large payloads.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Completes a frame begun with [`begin_frame`]: fills in the header and the CRC over the
/// payload written since.
pub fn finish_frame(out: &mut [u8], start: usize, kind: FrameKind) -> Result<(), DecodeError> {
    let payload_len = out.len() - start - HEADER_LEN;
    let len = u32::try_from(payload_len).map_err(|_| DecodeError::TooLarge {
        what: "frame payload",
        len: payload_len as u64,
        limit: u64::from(u32::MAX),
    })?;
    let h = &mut out[start..start + HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 12]);
    crc.update(&out[start + HEADER_LEN..]);
    let c = crc.finalize();
    out[start + 12..start + HEADER_LEN].copy_from_slice(&c.to_le_bytes());
    Ok(())
}

/// Reads the total length (header plus payload) of the frame at the start of `buf`,
/// once at least [`HEADER_LEN`] bytes are there. Lets a stream reader know how much to
/// buffer; the length is checked against `max_payload` first.
pub fn peek_frame_len(buf: &[u8], max_payload: usize) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    check_fixed(buf)?;
    let len = payload_len(buf);
    if len > max_payload as u64 {
        return Err(DecodeError::TooLarge {
            what: "frame payload",
            len,
            limit: max_payload as u64,
        });
    }
    Ok(Some(HEADER_LEN + len as usize))
}

fn payload_len(buf: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]))
}

fn check_fixed(buf: &[u8]) -> Result<FrameKind, DecodeError> {
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[4]));
    }
    let kind = FrameKind::from_u8(buf[5])?;
    let flags = u16::from_le_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    Ok(kind)
}

/// Decodes the frame at the start of `buf`, returning it and the number of bytes it
/// used. Checks magic, version, kind, flags, the payload length against `max_payload`
/// and the CRC. A buffer shorter than the frame is [`DecodeError::Truncated`].
pub fn decode_frame(buf: &[u8], max_payload: usize) -> Result<(FrameRef<'_>, usize), DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            what: "frame header",
        });
    }
    let kind = check_fixed(buf)?;
    let len = payload_len(buf);
    if len > max_payload as u64 {
        return Err(DecodeError::TooLarge {
            what: "frame payload",
            len,
            limit: max_payload as u64,
        });
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Err(DecodeError::Truncated {
            what: "frame payload",
        });
    }
    let expected = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..12]);
    crc.update(&buf[HEADER_LEN..total]);
    let actual = crc.finalize();
    if actual != expected {
        return Err(DecodeError::Checksum { expected, actual });
    }
    Ok((
        FrameRef {
            kind,
            payload: &buf[HEADER_LEN..total],
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, payload).unwrap();
        out
    }

    #[test]
    fn round_trip_and_length() {
        let f = frame(FrameKind::Offer, b"hello");
        assert_eq!(f.len(), HEADER_LEN + 5);
        assert_eq!(peek_frame_len(&f, 100).unwrap(), Some(f.len()));
        let (r, used) = decode_frame(&f, 100).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(r.kind, FrameKind::Offer);
        assert_eq!(r.payload, b"hello");
    }

    #[test]
    fn rejects_each_header_fault() {
        let f = frame(FrameKind::Batch, b"payload");
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_frame(&bad, 100),
            Err(DecodeError::BadMagic(_))
        ));
        let mut bad = f.clone();
        bad[4] = 9;
        assert_eq!(
            decode_frame(&bad, 100),
            Err(DecodeError::UnsupportedVersion(9))
        );
        let mut bad = f.clone();
        bad[5] = 77;
        assert_eq!(decode_frame(&bad, 100), Err(DecodeError::UnknownKind(77)));
        let mut bad = f.clone();
        bad[6] = 1;
        assert_eq!(decode_frame(&bad, 100), Err(DecodeError::ReservedFlags(1)));
        let mut bad = f.clone();
        bad[HEADER_LEN] ^= 0x40;
        assert!(matches!(
            decode_frame(&bad, 100),
            Err(DecodeError::Checksum { .. })
        ));
        assert!(matches!(
            decode_frame(&f[..f.len() - 1], 100),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame(&f, 3),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame(&f[..5], 100),
            Err(DecodeError::Truncated { .. })
        ));
        assert_eq!(peek_frame_len(&f[..5], 100), Ok(None));
    }
}
