//! Errors. Decoding errors name what was wrong and where; none of them is a panic.

use thiserror::Error;

/// Why a frame or message was rejected by a decoder.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the named field was complete.
    #[error("truncated input: {what} incomplete")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The frame does not start with the HDE magic.
    #[error("bad magic {0:02x?}, expected \"DWHE\"")]
    BadMagic([u8; 4]),
    /// The frame's format version is not one this decoder knows.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The frame kind byte is not a known kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved flag bits were set.
    #[error("reserved frame flags set: {0:#06x}")]
    ReservedFlags(u16),
    /// A length or count exceeds the decoder's limit.
    #[error("{what} too large: {len} > limit {limit}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// The value found.
        len: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The CRC-32 of the frame does not match its header.
    #[error("frame checksum mismatch: header says {expected:#010x}, content gives {actual:#010x}")]
    Checksum {
        /// The checksum in the header.
        expected: u32,
        /// The checksum computed over the frame.
        actual: u32,
    },
    /// Bytes were left over after a complete message.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// The message.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A varint was longer than 10 bytes or overflowed 64 bits.
    #[error("varint overflow in {what}")]
    VarintOverflow {
        /// The field.
        what: &'static str,
    },
    /// A field had a value that is not allowed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The field or message.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A batch names a dictionary the receiver was never sent.
    #[error("batch {batch} uses unknown dictionary {id:#018x}")]
    UnknownDictionary {
        /// The batch.
        batch: u64,
        /// The dictionary id.
        id: u64,
    },
    /// A page reference points past the pages received so far in this transfer.
    #[error("batch {batch}: reference to unique page {index}, only {known} known")]
    UnknownPageRef {
        /// The batch.
        batch: u64,
        /// The referenced unique-page index.
        index: u64,
        /// How many unique pages the receiver holds for this transfer.
        known: u64,
    },
    /// A page was sent as held by the receiver, but the receiver said it is missing
    /// (or never saw the offer).
    #[error("batch {batch}: offered page {index} is not held by the receiver")]
    NotHeld {
        /// The batch.
        batch: u64,
        /// Index into the batch's offer.
        index: u64,
    },
    /// Data frames arrived out of order.
    #[error("expected batch {expected}, got batch {got}")]
    UnexpectedBatch {
        /// The batch sequence number expected next.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A message arrived in a state where it is not allowed.
    #[error("unexpected {what}: {detail}")]
    Unexpected {
        /// The message kind.
        what: &'static str,
        /// Why it is not allowed now.
        detail: &'static str,
    },
    /// zstd rejected the compressed body.
    #[error("batch {batch}: decompression failed: {detail}")]
    Decompress {
        /// The batch.
        batch: u64,
        /// zstd's message.
        detail: String,
    },
    /// A page's content does not match the hash it was offered under.
    #[error("batch {batch}: page content does not match its offered hash")]
    HashMismatch {
        /// The batch.
        batch: u64,
    },
    /// The page store failed.
    #[error("page store: {0}")]
    Store(#[from] StoreError),
}

/// Errors from a [`crate::PageStore`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backing database failed.
    #[error("database: {0}")]
    Backend(String),
    /// A stored value had the wrong size (a corrupt store).
    #[error("corrupt entry: {0}")]
    Corrupt(&'static str),
    /// A page to insert was not exactly one page long.
    #[error("page must be {expected} bytes, got {got}")]
    BadPageSize {
        /// 4096.
        expected: usize,
        /// The length given.
        got: usize,
    },
}

/// Errors from the sender (encoder).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// Input pages must be whole 4096-byte pages.
    #[error("page input must be a multiple of 4096 bytes, got {0}")]
    NotPageAligned(usize),
    /// The transfer already had `finish` called.
    #[error("transfer already finished")]
    Finished,
    /// Page input and stream input were mixed in one transfer.
    #[error("a transfer carries either pages or a stream, not both")]
    ShapeMismatch,
    /// Too many batches are waiting for replies or compression; drain outputs first.
    #[error("{0} batches in flight, the limit; drain outputs and replies first")]
    Busy(usize),
    /// The receiver's reply is malformed or does not match an outstanding offer.
    #[error("bad reply: {0}")]
    BadReply(#[from] DecodeError),
    /// zstd failed (only on allocation failure or a bad parameter).
    #[error("zstd: {0}")]
    Compress(String),
}

/// A rejected configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is outside its allowed range.
    #[error("{field} = {value} is outside {range}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// The value given.
        value: i64,
        /// The allowed range.
        range: &'static str,
    },
}
